"""Workflow runner: stage order, skip-by-hash, refuse on changed config, --force.

For each stage the runner computes the content hash (config with defaults, input
hashes, fingerprints, format version), compares it with the hash stamped in the
existing output, and then skips (same hash, complete), resumes (same hash,
incomplete), refuses (different hash, unless ``--force``) or runs.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.workflow.config import StageEntry, Workflow, stage_hash
from pipeline.errors import ConfigError, StoreError
from pipeline.workflow.stage import RunContext
from pipeline.store.layout import read_attrs
from pipeline.store.location import is_remote, remove


@dataclass(frozen=True)
class OutputState:
    status: str  # missing | complete | partial | changed | foreign
    detail: str = ""


def output_state(path: Path, expected_hash: str) -> OutputState:
    attrs = read_attrs(path)
    # On object storage a prefix without a root zarr.json holds at most an uncommitted schema.
    if attrs is None and (not path.exists() or (is_remote(path) and not (path / "zarr.json").exists())):
        return OutputState("missing")
    if attrs is None:
        return OutputState("foreign", f"{path} exists and is not a diffprobe output")
    if attrs.get("stage_hash") != expected_hash:
        return OutputState("changed", f"{path} was written by stage config {str(attrs.get('stage_hash'))[:12]}")
    return OutputState("complete" if attrs.get("complete") else "partial")


def parse_shard(text: str | None) -> tuple[int, int]:
    """``i/N`` -> (i, N); default from RANK / WORLD_SIZE (torchrun, SLURM launchers), else (0, 1)."""
    if text is None:
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is not None and world is not None:
            text = f"{rank}/{world}"
        else:
            return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r} must look like i/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {text!r}: need 0 <= i < N")
    return i, n


class Runner:
    def __init__(self, workflow: Workflow, force: bool = False, shard: tuple[int, int] = (0, 1),
                 strict: bool = False, progress: bool = True, echo=None):
        self.wf = workflow
        self.force = force
        self.shard = shard
        self.strict = strict
        self.progress = progress
        self.echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.stages = {e.name: e.stage_class() for e in workflow.stages}
        self.hashes: dict[str, str] = {}
        for entry in workflow.stages:
            self.hashes[entry.name] = self._hash(entry)
        if force and shard[1] > 1:
            raise ConfigError("--force with --shard would let every shard delete the output; "
                              "delete it once, then launch the shards without --force")

    def _hash(self, entry: StageEntry) -> str:
        inputs = {f: ([self.hashes[r] for r in refs] if isinstance(refs, tuple) else self.hashes[refs])
                  for f, refs in entry.inputs.items() if refs is not None}
        extra = self.stages[entry.name].fingerprint(entry.config, self.wf.base_dir)
        return stage_hash(entry.kind, entry.config, inputs, extra, self.wf.base_dir)

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
                          shard=self.shard, strict=self.strict, progress=self.progress)

    def check_inputs(self, entry: StageEntry) -> None:
        for refs in entry.inputs.values():
            for ref in (refs if isinstance(refs, tuple) else (refs,)):
                if ref is None:
                    continue
                src = self.wf.stage(ref)
                state = output_state(src.output, self.hashes[ref])
                if state.status != "complete":
                    why = {"missing": "has not been run", "partial": "is incomplete",
                           "changed": "was written with another config", "foreign": "is not a diffprobe output"}
                    raise StoreError(
                        f"stage {entry.name!r} needs {ref!r}, whose output {src.output} {why[state.status]}; "
                        f"run it first: diffprobe run {self.wf.file} --only {ref}"
                    )

    def run(self, only: str | None = None, until: str | None = None, dry_run: bool = False) -> list[tuple[str, str]]:
        """Run the selected stages in order; returns (stage, action) rows."""
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
        for entry in selected:
            state = output_state(entry.output, self.hashes[entry.name])
            if state.status == "complete" and not self.force:
                action = "skip (up to date)"
            elif state.status in ("changed", "foreign") and not self.force:
                raise StoreError(
                    f"stage {entry.name!r}: {state.detail}, not by this config (hash {self.hashes[entry.name][:12]}); "
                    f"re-run with --force to replace it, or set another 'output:'"
                )
            elif state.status == "partial" and not self.force:
                action = "resume"
            else:
                action = "run" if state.status == "missing" else "replace (--force)"
            report.append((entry.name, action))
            if dry_run:
                self.echo(f"{entry.name} ({entry.kind}) -> {entry.output}: {action}")
                continue
            if action.startswith("skip"):
                self.echo(f"[{entry.name}] up to date, skipped ({entry.output})")
                continue
            self.check_inputs(entry)
            if action.startswith("replace"):
                remove(entry.output)
            self.echo(f"[{entry.name}] {action}: {entry.kind} -> {entry.output}")
            start = time.perf_counter()
            self.stages[entry.name].run(entry.config, self.context(entry))
            self.echo(f"[{entry.name}] finished in {time.perf_counter() - start:.1f} s")
        return report
