"""Workflow runner: stage order, skip-by-hash, refuse on changed config, --force.

For each stage the runner computes the content hash (hashed config with defaults,
input hashes, model files, the dataset's ordered image ids, format version), compares
it with the hash stamped in the existing output, and then

- skips it (same hash, complete), resumes it (same hash, incomplete),
- replaces it without asking when it holds no finished work (an output another
  config created and then failed in, before any unit was done),
- refuses, naming what changed (another hash, unless ``--force``),
- refuses always when the path is not a diffprobe output (a user's file or folder
  is never deleted, not even with ``--force``).

``--force`` replaces only outputs whose hash changed, plus the stage named with
``--only``; an up-to-date input of a changed stage is never deleted. Each stage run
holds a lease (``pipeline.workflow.claims``): its ``--shard i/N`` share, or the whole
stage for stages that do not shard; a second process on the same share is refused
with the holder's pid and host. Outputs on object storage hold their leases there
too (beside the store, under the same URL prefix).

One run pays its fixed costs once: the dask stages share one cluster
(``pipeline.cluster.session.ClusterSession``, started at the first stage with work
for it, closed when the run ends, fails or is interrupted), and what ``validate``
built for a stage (a model built where the stage runs; hashing and validate share
one dataset listing, ``run`` lists again) is handed to the stage's ``run`` through
``RunContext.prepared`` and dropped once the stage has run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError, DatasetError, StoreError, is_storage_error
from pipeline.store.layout import ATTR_KEY, read_attrs
from pipeline.store.location import as_location, is_remote, remove
from pipeline.workflow.config import StageEntry, Workflow, hash_document, stage_hash
from pipeline.workflow.stage import RunContext

@dataclass(frozen=True)
class OutputState:
    status: str  # missing | complete | partial | changed | stale | foreign
    detail: str = ""


def has_finished_work(path: Path, attrs: dict) -> bool:
    """Whether an output holds anything a replace would lose: a done unit (unit stores),
    a finished task (probe / cka results), or a completed stamp."""
    if attrs.get("complete"):
        return True
    if "layout" in attrs:
        from pipeline.store.layout import unit_status

        try:
            return bool(unit_status(path).any())
        except Exception:  # noqa: BLE001 -- an unreadable store is not known to be empty
            return True
    tasks = path / "tasks"
    return tasks.is_dir() and any(tasks.glob("*.json"))


def output_state(path: Path, expected_hash: str) -> OutputState:
    # On object storage a prefix without a root zarr.json holds at most an uncommitted schema.
    # The root zarr.json is PUT last, whole, so it is looked for before the attrs are read:
    # read the other way round, a schema another shard process commits between the two
    # requests would look like a foreign folder.
    if is_remote(path) and not (path / "zarr.json").exists():
        return OutputState("missing")
    attrs = read_attrs(path)
    if attrs is None and not path.exists():
        return OutputState("missing")
    if attrs is None:
        if not is_remote(path) and not path.is_dir():
            return OutputState("foreign", f"{path} is a file, not a diffprobe output")
        if not is_remote(path) and not any(path.iterdir()):
            return OutputState("missing")  # an empty folder: nothing to lose
        return OutputState("foreign", f"{path} exists and is not a diffprobe output")
    if attrs.get("stage_hash") != expected_hash:
        if not has_finished_work(path, attrs):
            return OutputState("stale", f"{path} holds no finished work of another config")
        return OutputState("changed", f"{path} was written by stage config {str(attrs.get('stage_hash'))[:12]}")
    return OutputState("complete" if attrs.get("complete") else "partial")


def parse_shard(text: str | None) -> tuple[int, int]:
    """``i/N`` -> (i, N); default from RANK / WORLD_SIZE (torchrun, SLURM launchers), else (0, 1)."""
    what = "--shard"
    if text is None:
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is None and world is None:
            return 0, 1
        if rank is None or world is None:
            missing, present = ("RANK", "WORLD_SIZE") if rank is None else ("WORLD_SIZE", "RANK")
            raise ConfigError(f"environment variable {present} is set but {missing} is not; set both "
                              f"(shard = RANK/WORLD_SIZE), unset {present}, or pass --shard i/N")
        text, what = f"{rank}/{world}", f"RANK/WORLD_SIZE from the environment ({rank!r}/{world!r})"
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        if what != "--shard":
            raise ConfigError(f"{what} must be integers with 0 <= RANK < WORLD_SIZE; "
                              "fix them, or pass --shard i/N") from None
        raise ConfigError(f"--shard {text!r} must look like i/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        if what != "--shard":
            raise ConfigError(f"{what}: need 0 <= RANK < WORLD_SIZE; fix them, or pass --shard i/N")
        raise ConfigError(f"--shard {text!r}: need 0 <= i < N")
    return i, n


def record_wall_time(path, seconds: float) -> None:
    """Add ``wall_time_s`` (this run of the stage, seconds) to an output's diffprobe attrs.

    The report's cost table reads it; it is not part of the hash, and a resumed stage
    records the run that completed it. The root ``zarr.json`` is replaced whole (temp
    file + rename locally, one PUT on object storage): root attributes are not part of
    the consolidated metadata, which stays valid as it is.
    """
    if read_attrs(path) is None:
        return
    meta = as_location(path) / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"][ATTR_KEY]["wall_time_s"] = round(seconds, 3)
    text = json.dumps(doc, indent=2)
    if is_remote(path):
        meta.write_text(text)
        return
    tmp = meta.with_name(f".zarr.json.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, meta)


def _differences(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two hash documents, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    if old != new:
        short = lambda v: (repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "...")
        return [f"{prefix}: {short(old)} -> {short(new)}"]
    return []


def _tree_size(path: Path) -> tuple[int, int]:
    if is_remote(path):
        return 0, 0
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return len(files), sum(p.stat().st_size for p in files)


class _LazyHashes(dict):
    """stage name -> stage hash, computed (with its inputs') when first asked for."""

    def __init__(self, runner: Runner):
        super().__init__()
        self.runner = runner

    def __missing__(self, name: str) -> str:
        value = self.runner._hash(self.runner.wf.stage(name))
        self[name] = value
        return value


class Runner:
    def __init__(self, workflow: Workflow, force: bool = False, shard: tuple[int, int] = (0, 1),
                 strict: bool = False, progress: bool = True, echo=None, on_validated=None):
        self.wf = workflow
        self.force = force
        self.shard = shard
        self.strict = strict
        self.progress = progress
        self.echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
        #: Called once ``run`` has validated its stages, before the first one runs (the
        #: ``diffprobe`` program resumes its garbage collector there).
        self.on_validated = on_validated
        self.stages = {e.name: e.stage_class() for e in workflow.stages}
        # Hashed on first use: a stage's hash opens its dataset (for the image ids), so
        # only the stages a command touches, and their inputs, need their data here.
        self.hashes: dict[str, str] = _LazyHashes(self)
        self.identities: dict[str, dict] = {}
        self.records: dict[str, list] = {}
        #: stage name -> what validate (and hashing) built for it (``RunContext.prepared``).
        self.prepared: dict[str, dict] = {}
        #: The run's cluster session while ``run`` is running (None otherwise).
        self.cluster = None
        if force and shard[1] > 1:
            raise ConfigError("--force with --shard would let every shard delete the output; "
                              "delete it once, then launch the shards without --force")

    def _data_identity(self, entry: StageEntry) -> dict | None:
        """The dataset identity of a stage that computes rows of a dataset (None otherwise).

        Where the dataset cannot be opened (analysis on a machine without it), the
        identity stamped in the existing output stands in, so later stages still hash.
        """
        from pipeline.workflow.identity import dataset_identity

        try:
            records = self.stages[entry.name].dataset_records(entry.config, self.prepared.setdefault(entry.name, {}))
        except DatasetError:
            stamped = ((read_attrs(entry.output) if entry.output.is_dir() else None) or {}).get("identity", {})
            if "data" in stamped.get("extra", {}):
                return stamped["extra"]["data"]
            raise
        if records is None:
            return None
        self.records[entry.name] = records
        return dataset_identity(records)

    def _hash(self, entry: StageEntry) -> str:
        inputs = {f: ([self.hashes[r] for r in refs] if isinstance(refs, tuple) else self.hashes[refs])
                  for f, refs in entry.inputs.items() if refs is not None}
        extra = dict(self.stages[entry.name].fingerprint(entry.config, self.wf.base_dir))
        data = self._data_identity(entry)
        if data is not None:
            extra["data"] = data
        self.identities[entry.name] = hash_document(entry.kind, entry.config, inputs, extra, self.wf.base_dir)
        return stage_hash(entry.kind, entry.config, inputs, extra, self.wf.base_dir)

    def explain_change(self, entry: StageEntry) -> str:
        """What differs between the config that wrote ``entry.output`` and this one, in words."""
        from pipeline.workflow.identity import first_difference, stored_image_ids

        stamped = (read_attrs(entry.output) or {}).get("identity")
        if not stamped:
            return "it was written by an older diffprobe or another config"
        new = self.identities[entry.name]
        if stamped.get("extra", {}).get("data") != new.get("extra", {}).get("data") and entry.name in self.records:
            try:
                ids = stored_image_ids(entry.output)
            except Exception:  # noqa: BLE001 -- fall back to the generic difference
                ids = None
            if ids is not None:
                where = first_difference(ids, self.records[entry.name].ids.tolist())
                return f"the dataset changed: {where or 'the image labels differ'}"
        diffs = _differences(stamped, new)
        more = f" (and {len(diffs) - 2} more)" if len(diffs) > 2 else ""
        return "; ".join(diffs[:2]) + more if diffs else "the stage hash differs"

    def select(self, only: str | None = None, until: str | None = None) -> list[StageEntry]:
        if only:
            return [self.wf.stage(only)]
        if until:
            self.wf.stage(until)
            names = [e.name for e in self.wf.stages]
            return list(self.wf.stages[: names.index(until) + 1])
        return list(self.wf.stages)

    def context(self, entry: StageEntry) -> RunContext:
        inputs = {}
        for f, refs in entry.inputs.items():
            if refs is None:
                continue
            paths = tuple(self.wf.stage(r).output for r in (refs if isinstance(refs, tuple) else (refs,)))
            inputs[f] = paths if isinstance(refs, tuple) else paths[0]
        return RunContext(self.wf, entry, entry.output, inputs, self.hashes[entry.name],
                          shard=self.shard, strict=self.strict, progress=self.progress,
                          identity=self.identities[entry.name], cluster=self.cluster,
                          prepared_by_stage=self.prepared)

    def check_inputs(self, entry: StageEntry) -> None:
        for refs in entry.inputs.values():
            for ref in (refs if isinstance(refs, tuple) else (refs,)):
                if ref is None:
                    continue
                src = self.wf.stage(ref)
                state = output_state(src.output, self.hashes[ref])
                if state.status == "partial":
                    self.refuse_if_being_completed(entry, ref, src.output)
                if state.status != "complete":
                    why = {"missing": "has not been run", "partial": "is incomplete",
                           "changed": "was written with another config", "stale": "was written with another config",
                           "foreign": "is not a diffprobe output"}
                    raise StoreError(
                        f"stage {entry.name!r} needs {ref!r}, whose output {src.output} {why[state.status]}; "
                        f"run it first: diffprobe run {self.wf.file} --only {ref}"
                    )

    def refuse_if_being_completed(self, entry: StageEntry, ref: str, output) -> None:
        """An input another live process is still filling: say so, rather than "run it first"."""
        from pipeline.workflow.claims import Claims

        claims = Claims(output)
        live = claims.live_others()
        if live:
            name, holder = next(iter(live.items()))
            raise StoreError(
                f"stage {entry.name!r} needs {ref!r}, whose output {output} is still being computed by "
                f"another process ({len(live)} lease(s), e.g. {name} held by {holder.describe(claims.timeout)}); "
                f"run again once it has finished (diffprobe inspect {output} shows what is left)")

    def check_output_paths(self, selected: list[StageEntry]) -> None:
        """An output folder whose parent is a file: one line, before anything runs."""
        for entry in selected:
            for parent in entry.output.parents:
                if parent.exists():
                    if not parent.is_dir():
                        raise ConfigError(f"stage {entry.name!r}: {parent} (on the way to {entry.output}) is a "
                                          "file, not a folder; set output_dir (or 'output:') to a folder")
                    break

    def decide(self, entry: StageEntry, only: str | None) -> str:
        """The action for one stage: run, resume, skip, replace; or a refusal (StoreError)."""
        state = output_state(entry.output, self.hashes[entry.name])
        named = only == entry.name
        if state.status == "foreign":
            raise StoreError(f"stage {entry.name!r}: {state.detail}; diffprobe never deletes what it did not "
                             f"write (not even with --force): move it away, or set another 'output:'")
        if state.status == "missing":
            return "run"
        if state.status == "stale":
            return "replace (holds no finished work of another config)"
        if state.status == "changed":
            if not self.force:
                raise StoreError(
                    f"stage {entry.name!r}: {entry.output} was written by another config "
                    f"({self.explain_change(entry)}); re-run with --force to replace it, or set another 'output:'")
            return "replace (--force)"
        if self.force and named:
            return "replace (--force)"
        return "skip (up to date)" if state.status == "complete" else "resume"

    def validate(self, selected: list[StageEntry]) -> None:
        """Every check a stage can make without computing, before any stage runs (``--dry-run`` too)."""
        for entry in selected:
            if self.force or output_state(entry.output, self.hashes[entry.name]).status != "complete":
                self.stages[entry.name].validate(entry.config, self.context(entry))

    def run(self, only: str | None = None, until: str | None = None, dry_run: bool = False) -> list[tuple[str, str]]:
        """Run the selected stages in order; returns (stage, action) rows."""
        from pipeline.cluster.session import ClusterSession

        with ClusterSession(self.wf.cluster, log=self.echo) as self.cluster:
            try:
                return self._run(only, until, dry_run)
            finally:
                self.cluster = None

    def _run(self, only: str | None, until: str | None, dry_run: bool) -> list[tuple[str, str]]:
        report = []
        selected = self.select(only, until)
        if self.shard[1] > 1:
            whole = [f"{e.name!r} ({e.kind})" for e in selected if not self.stages[e.name].shardable]
            if whole:
                shardable = [e.name for e in self.wf.stages if self.stages[e.name].shardable]
                more = f" and {len(whole) - 2} more" if len(whole) > 2 else ""
                raise ConfigError(
                    f"--shard splits only extract and classify stages; {', '.join(whole[:2])}{more} would run "
                    f"whole in every shard. Shard {', '.join(shardable) or 'none of them'} (--only NAME or "
                    f"--until NAME), then run the rest once without --shard"
                )
        self.check_output_paths(selected)
        self.validate(selected)
        if self.on_validated is not None:
            self.on_validated()
        for entry in selected:
            action = self.decide(entry, only)
            report.append((entry.name, action))
            if dry_run:
                line = f"{entry.name} ({entry.kind}) -> {entry.output}: {action}"
                if action.startswith("replace"):
                    n_files, size = _tree_size(entry.output)
                    from pipeline.store.describe import human_bytes

                    line += f"; would delete {entry.output} ({n_files} files, {human_bytes(size)})"
                self.echo(line)
                continue
            if action.startswith("skip"):
                self.echo(f"[{entry.name}] up to date, skipped ({entry.output})")
                continue
            self.check_inputs(entry)
            self.echo(f"[{entry.name}] {action}: {entry.kind} -> {entry.output}")
            start = time.perf_counter()
            try:
                self._run_stage(entry, replace=action.startswith("replace"))
            except OSError as exc:
                if is_storage_error(exc):
                    raise storage_error(entry, exc, self._results_bytes(entry)) from exc
                raise
            elapsed = time.perf_counter() - start
            self.prepared.pop(entry.name, None)  # its model and records are not needed again
            if self.shard[1] == 1:  # shards finish at different times; no one wall time to record
                record_wall_time(entry.output, elapsed)
            self.echo(f"[{entry.name}] finished in {elapsed:.1f} s")
        return report

    def _results_bytes(self, entry: StageEntry) -> int | None:
        """The stage's estimate of its results' size (None if it has none or cannot say now)."""
        try:
            return self.stages[entry.name].results_bytes(entry.config, self.context(entry))
        except Exception:  # noqa: BLE001 -- an estimate for an error line must not hide the error
            return None

    def _run_stage(self, entry: StageEntry, replace: bool) -> None:
        """Run one stage under its lease; replace (delete) the old output first if asked."""
        from pipeline.workflow.claims import Claims, remove_claims, shard_lease

        stage = self.stages[entry.name]
        claims = Claims(entry.output)
        if stage.shardable and self.shard[1] > 1:
            lease, label = shard_lease(self.shard), f"stage {entry.name}, shard {self.shard[0]}/{self.shard[1]}"
        elif not stage.shardable:
            lease, label = "stage", f"stage {entry.name}"
        else:
            lease = label = None  # unsharded extract / classify: units are claimed one by one
        with claims:
            if lease is not None:
                holder = claims.try_claim(lease, label)
                if holder is not None:
                    raise StoreError(f"{label} is already running: {holder.describe(claims.timeout)}; "
                                     "wait for it (or run another shard)")
            if replace:
                others = claims.live_others()
                if others:
                    holder = next(iter(others.values()))
                    raise StoreError(f"stage {entry.name!r}: not replacing {entry.output}: another process "
                                     f"is writing it ({holder.describe(claims.timeout)})")
                remove(entry.output)
            ctx = self.context(entry)
            ctx.claims = claims
            stage.run(entry.config, ctx)
        if (read_attrs(entry.output) or {}).get("complete"):
            remove_claims(entry.output)


def storage_error(entry: StageEntry, exc: OSError, results_bytes: int | None = None) -> StoreError:
    """A full, read-only or forbidden output file system, as one line naming what to do.

    For a full one: the free space, and about how much more the output needs (a unit
    store's remaining units, ``pipeline.store.space``; else ``results_bytes``, what the
    stage says its results take in all)."""
    from pipeline.store.describe import human_bytes
    from pipeline.store.space import unit_bytes_needed

    where = entry.output
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        free = shutil.disk_usage(probe).free
        need = unit_bytes_needed(where)
        if need:
            more, kept = f"; about {human_bytes(need)} more are needed for the rest", "finished units are kept"
        else:
            more = f"; the results need about {human_bytes(results_bytes)} in all" if results_bytes else ""
            kept = "finished units are kept" if "layout" in (read_attrs(where) or {}) else "finished tasks are kept"
        what = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file size limit reached"}[exc.errno]
        return StoreError(f"stage {entry.name!r}: {what} writing {where} ({human_bytes(free)} free{more}); "
                          f"free space (or set another output_dir) and run again: {kept}")
    return StoreError(f"stage {entry.name!r}: cannot write {where}: {os.strerror(exc.errno)}"
                      f"{f' ({exc.filename})' if exc.filename else ''}; make it writable, "
                      "or set another output_dir / 'output:'")
