"""Workflow YAML -> frozen dataclasses, validation with file:line messages, content hashing.

A workflow file::

    name: demo
    output_dir: ../runs/demo          # relative paths are relative to this file
    cluster: {kind: local, n_workers: 2}
    stages:
      - name: trained                 # unique; other stages refer to it
        stage: extract                # a registered stage kind
        model: {path: ../data/models/digits-ddpm, null_class: 10}
        ...                           # the stage's own parameters
      - name: pooled
        stage: pool
        input: trained                # an input: the name of an earlier stage

Validation is hand-written rather than pydantic/dacite: we need YAML line numbers
in one-line messages and "did you mean" hints, and the types involved are few.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

import pipeline
from pipeline.errors import ConfigError, did_you_mean
from pipeline.store import location
from pipeline.store.location import is_url

#: The workflow's ``storage_options`` while its stages are built: a URL in a path field
#: (dataset ``root``, model ``path`` / ``config``) becomes a :class:`location.URLText` carrying them.
_STORAGE_OPTIONS: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("storage_options",
                                                                                       default=None)

# ---------------------------------------------------------------- YAML with line numbers


class LineDict(dict):
    """A dict that remembers the 1-based line of each key (``lines``) and of itself (``line``)."""

    line: int = 0
    lines: dict


class _LineLoader(yaml.SafeLoader):
    pass


MERGE_TAG = "tag:yaml.org,2002:merge"


def _construct_mapping(loader, node, deep=False):
    explicit = sum(1 for key_node, _ in node.value if key_node.tag != MERGE_TAG)
    loader.flatten_mapping(node)
    # flatten_mapping puts the pairs of ``<<: *anchor`` merges first; a key written in the
    # mapping itself overrides a merged one (YAML's merge-key rule: how the templates share
    # a stage's settings and change one), while a key written twice is a mistake.
    merged = len(node.value) - explicit
    out = LineDict()
    out.line = node.start_mark.line + 1
    out.lines = {}
    written = set()
    for i, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        if i >= merged:
            if key in written:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            written.add(key)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"workflow file {str(path)!r} not found") from None
    try:
        return yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None


# ---------------------------------------------------------------- dataclass validation


class Where:
    """Where a value came from, for messages: file, line, dotted key path."""

    def __init__(self, file: Path | None, line: int | None, key: str):
        self.file, self.line, self.key = file, line, key

    def child(self, key: str, mapping: Any = None) -> Where:
        line = self.line
        if isinstance(mapping, LineDict):
            line = mapping.lines.get(key, mapping.line)
        return Where(self.file, line, f"{self.key}.{key}" if self.key else str(key))

    def __str__(self) -> str:
        loc = f"{self.file}" if self.file else "config"
        if self.line:
            loc += f":{self.line}"
        return f"{loc}: '{self.key}'" if self.key else loc


def _type_name(tp) -> str:
    """``tp`` in a researcher's words: a list, a string, a mapping ... (not Python type names)."""
    origin = get_origin(tp)
    if origin is tuple:
        return "a list"
    if origin is Literal:
        return " or ".join(repr(v) for v in get_args(tp))
    if dataclasses.is_dataclass(tp) or tp is dict or origin is dict:
        return "a mapping"
    plain = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return plain.get(tp) or getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


#: What a field that takes several forms looks like, by key, for the type-error message.
FORM_HINTS = {
    "blocks": "a list of block names, e.g. [down_blocks.2, mid_block], or 'all'",
    "timesteps": "a list of integers, e.g. [50, 100], or 'all'",
    "pools": "a list of pool sizes, e.g. [1, 2, 4], or 'all'",
}


def coerce(value: Any, tp: Any, where: Where, base_dir: Path | None = None, path_kind: str | None = None) -> Any:
    """Check ``value`` against type hint ``tp`` and convert (lists -> tuples, dicts -> dataclasses)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where, base_dir, path_kind)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        names = FORM_HINTS.get(str(where.key).rsplit(".", 1)[-1]) or \
            " or ".join(_type_name(o) for o in options if o is not type(None))
        raise ConfigError(f"{where} must be {names}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(
                f"{where} is {value!r}{did_you_mean(value, get_args(tp))}; valid: {', '.join(map(str, get_args(tp)))}"
            )
        return value
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = args[0]
        return tuple(coerce(v, inner, where.child(str(i)), base_dir, path_kind) for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {k: _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where, base_dir)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-3 as a string; accept what is plainly a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        if path_kind and is_url(value):
            if path_kind == "factory":
                raise ConfigError(f"{where}: {value!r}: a factory is imported from a local file or package; "
                                  "copy the file to a local disk")
            return location.URLText(value, _STORAGE_OPTIONS.get())
        return resolve_path(value, base_dir, path_kind) if path_kind else value
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # a diffprobe bug, not user input


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def resolve_path(value: str, base_dir: Path | None, kind: str) -> str:
    """Relative paths are relative to the workflow file; ``factory`` resolves only a ``.py`` target."""
    if base_dir is None:
        return value
    if kind == "factory":
        target, sep, func = value.rpartition(":")
        if sep and target.endswith(".py") and not os.path.isabs(target):
            return f"{(base_dir / target).resolve()}:{func}"
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base_dir / p).resolve())


def build_dataclass(cls, data: Any, where: Where, base_dir: Path | None = None):
    """Validate a mapping into the frozen dataclass ``cls`` (unknown keys and bad types are errors)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of {cls.__name__} parameters, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"{where.child(key, data)}: unknown key{did_you_mean(key, fields)}; valid keys: {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], where.child(name, data), base_dir, f.metadata.get("path"))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


# ---------------------------------------------------------------- workflow


@dataclass(frozen=True)
class ClusterConfig:
    """Where dask stages run.

    kind: ``local`` (LocalCluster), ``address`` (a running ``dask scheduler``),
        ``slurm`` (dask-jobqueue SLURMCluster; extra ``diffprobe[slurm]``).
    slurm_wait_s: how long a ``slurm`` run may be without any connected worker (at start,
        or after its jobs ended) before it stops with a line saying why.
    slurm_replacements: how many lost worker jobs (cancelled, pre-empted, failed) are
        resubmitted in all.
    slurm_orphan_s: a client killed without cleaning up (``kill -9``, the OOM killer) has
        its worker jobs, queued or running, cancelled within this many seconds, by a
        watchdog process beside it (``pipeline.cluster.slurm``).
    n_workers: 0 (``local`` only) runs every task in this process, without dask.
    in_process_mib: (``local``) a stage with one task, or whose tasks read at most this
        many MiB in all, runs in this process instead of on the cluster (0: never);
        see ``pipeline.cluster.session``.
    """

    kind: Literal["local", "address", "slurm"] = "local"
    n_workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str = "4GiB"
    address: str | None = None
    slurm: dict = field(default_factory=dict)
    slurm_wait_s: float = 600.0
    slurm_replacements: int = 4
    slurm_orphan_s: float = 10.0
    dashboard: bool = True
    in_process_mib: float = 256.0


@dataclass(frozen=True)
class StageEntry:
    """One stage of a workflow after validation."""

    name: str
    kind: str
    config: Any
    inputs: dict  # config field -> name of the stage it reads
    output: Path
    line: int
    stage_class: type | None = None  # the registry's class for ``kind``


@dataclass(frozen=True)
class Workflow:
    name: str
    file: Path
    base_dir: Path
    output_dir: Path
    cluster: ClusterConfig
    stages: tuple[StageEntry, ...]
    #: fsspec options for every URL of the workflow (never hashed, stored or logged).
    storage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def stage(self, name: str) -> StageEntry:
        for entry in self.stages:
            if entry.name == name:
                return entry
        names = [e.name for e in self.stages]
        raise ConfigError(f"no stage named {name!r}{did_you_mean(name, names)}; stages: {', '.join(names)}")


def load_workflow(path: str | Path, registry: Mapping[str, type]) -> Workflow:
    """Read and validate a workflow file; every error names the file, line and key.

    Parameters
    ----------
    path : the workflow YAML.
    registry : stage kind -> Stage class (``stages.STAGES``); the framework knows no
        concrete stage, so the caller (the CLI) hands the registry in.
    """
    path = Path(path)
    doc = load_yaml(path)
    base = path.resolve().parent
    top = Where(path, 1, "")
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a workflow is a mapping with 'name', 'output_dir' and 'stages'")
    allowed = ("name", "output_dir", "storage_options", "cluster", "stages")
    for key in doc:
        if key not in allowed:
            raise ConfigError(f"{top.child(key, doc)}: unknown key{did_you_mean(key, allowed)}; valid keys: {', '.join(allowed)}")
    name = coerce(doc.get("name", path.stem), str, top.child("name", doc))
    storage_options = _plain(doc.get("storage_options") or {})
    if not isinstance(storage_options, dict):
        raise ConfigError(f"{top.child('storage_options', doc)}: must be a mapping of fsspec options, "
                          f"e.g. {{endpoint_url: https://...}}")
    output_dir = location.parse(coerce(doc.get("output_dir", f"runs/{name}"), str, top.child("output_dir", doc)),
                                base, storage_options)
    cluster = build_dataclass(ClusterConfig, doc.get("cluster"), top.child("cluster", doc), base)
    raw_stages = doc.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError(f"{top.child('stages', doc)}: must be a non-empty list of stages")
    token = _STORAGE_OPTIONS.set(storage_options)
    try:
        entries = _build_stages(path, raw_stages, registry, base, output_dir, storage_options)
    finally:
        _STORAGE_OPTIONS.reset(token)
    return Workflow(name, path, base, output_dir, cluster, tuple(entries), storage_options)


def _build_stages(path: Path, raw_stages: list, registry: Mapping[str, type], base: Path, output_dir,
                  storage_options: Mapping[str, Any]) -> list[StageEntry]:
    entries: list[StageEntry] = []
    for i, raw in enumerate(raw_stages):
        where = Where(path, getattr(raw, "line", None), f"stages[{i}]")
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: each stage is a mapping with 'name' and 'stage'")
        params = dict(raw)
        sname = params.pop("name", None)
        kind = params.pop("stage", None)
        output = params.pop("output", None)
        if not isinstance(sname, str) or not sname:
            raise ConfigError(f"{where}: missing 'name' (a unique name for this stage)")
        where = Where(path, raw.line, f"stages.{sname}")
        if kind not in registry:
            raise ConfigError(
                f"{where.child('stage', raw)}: unknown stage {kind!r}{did_you_mean(str(kind), registry)}; valid: {', '.join(registry)}"
            )
        if any(e.name == sname for e in entries):
            raise ConfigError(f"{where}: duplicate stage name {sname!r}")
        stage_cls = registry[kind]
        params = LineDict(params)
        params.line, params.lines = raw.line, raw.lines
        cfg = build_dataclass(stage_cls.Config, params, where, base)
        inputs = {}
        for f in dataclasses.fields(cfg):
            if f.metadata.get("input"):
                refs = getattr(cfg, f.name)
                for ref in (refs if isinstance(refs, tuple) else (refs,)):
                    if ref is None:
                        continue
                    if not any(e.name == ref for e in entries):
                        earlier = [e.name for e in entries]
                        raise ConfigError(
                            f"{where.child(f.name, raw)}: input {ref!r} is not an earlier stage{did_you_mean(ref, earlier)}; "
                            f"earlier stages: {', '.join(earlier) or 'none'}"
                        )
                inputs[f.name] = refs
        out = location.parse(coerce(output, str, where.child("output", raw)), base, storage_options) if output else output_dir / f"{sname}{stage_cls.output_suffix}"
        entries.append(StageEntry(sname, kind, cfg, inputs, out, raw.line, stage_cls))
    return entries


# ---------------------------------------------------------------- hashing


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_dict(cfg: Any, base_dir: Path | None = None, hashed: bool = False) -> dict:
    """``asdict`` with path fields made relative to ``base_dir`` (so a moved clone hashes alike).

    ``hashed=True`` gives the part of the config that is the output's identity: fields
    marked ``metadata={"hash": False}`` (settings that cannot change a stored value:
    batch size, loader workers) are left out, and ``{"hash": "device"}`` fields keep
    only the device type (``cuda:1`` -> ``cuda``: kernels differ between CPU and GPU,
    not between two GPUs of one kind).
    """
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        rule = f.metadata.get("hash", True)
        if hashed and rule is False:
            continue
        if hashed and rule == "device" and isinstance(value, str):
            value = value.split(":", 1)[0]
        if dataclasses.is_dataclass(value):
            value = config_dict(value, base_dir, hashed)
        elif isinstance(value, tuple):
            value = [config_dict(v, base_dir, hashed) if dataclasses.is_dataclass(v) else v for v in value]
        elif isinstance(value, location.URLText):
            value = str(value)  # the bare URL: its storage options are never hashed or stored
        elif f.metadata.get("path") and isinstance(value, str) and base_dir is not None:
            target, sep, func = value.rpartition(":") if f.metadata["path"] == "factory" else ("", "", value)
            p = target if sep else value
            if os.path.isabs(p):
                p = os.path.relpath(p, base_dir)
            value = f"{p}:{func}" if sep else p
        out[f.name] = value
    return out


def not_hashed(default: Any) -> Any:
    """A config field that cannot change stored values (batch size, workers): not in the stage hash,
    so a run resumed with another value continues the same output."""
    return field(default=default, metadata={"hash": False})


def device_field(default: str = "cpu") -> Any:
    """The ``device`` field: only its type (cpu / cuda / mps) is in the stage hash, not its index."""
    return field(default=default, metadata={"hash": "device"})


def hash_document(kind: str, cfg: Any, input_hashes: dict, extra: dict | None = None,
                  base_dir: Path | None = None) -> dict:
    """What :func:`stage_hash` hashes (also stamped in outputs, so a refusal can say what changed)."""
    return {
        "stage": kind,
        "config": config_dict(cfg, base_dir, hashed=True),
        "inputs": input_hashes,
        "extra": extra or {},
        "format_version": pipeline.FORMAT_VERSION,
    }


def stage_hash(kind: str, cfg: Any, input_hashes: dict, extra: dict | None = None, base_dir: Path | None = None) -> str:
    """sha256 of canonical JSON: stage kind, hashed config (defaults included), input hashes,
    extra identity (model files, the dataset's ordered image ids), format version."""
    doc = hash_document(kind, cfg, input_hashes, extra, base_dir)
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()
