"""The stage contract: a frozen config dataclass + compute + declared inputs and output.

A stage class names its ``Config`` dataclass (fields with ``metadata={"input": True}``
name earlier stages it reads), its output suffix, and implements ``run``. The
runner (``pipeline/workflow/runner.py``) resolves paths, checks inputs, hashes, skips and
refuses; stages only compute and write through ``pipeline.store``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.errors import StoreError
from pipeline.workflow.config import StageEntry, Workflow, config_dict


@dataclass
class RunContext:
    """Everything a stage needs from the runner for one run."""

    workflow: Workflow
    entry: StageEntry
    output: Path
    inputs: dict[str, Any]  # config field -> Path (or tuple of Paths) of the input outputs
    stage_hash: str
    shard: tuple[int, int] = (0, 1)
    strict: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)
    #: What the stage hash was computed from (config, inputs, model files, dataset identity).
    identity: dict = field(default_factory=dict)
    #: This process's leases on the output (set by the runner; None in direct calls).
    claims: Any = None
    #: The run's ``pipeline.cluster.session.ClusterSession`` (set by the runner; None in
    #: direct calls, where :meth:`cluster_session` opens one for the stage).
    cluster: Any = None
    #: stage name -> what the runner's hashing and ``validate`` already built for that
    #: stage (its dataset reader, a model built on the stage's device), for ``run`` to
    #: reuse instead of building it again; empty in direct calls. Keys belong to the stage.
    prepared_by_stage: dict = field(default_factory=dict)

    @property
    def prepared(self) -> dict:
        """This stage's share of :attr:`prepared_by_stage` (created empty on first use)."""
        return self.prepared_by_stage.setdefault(self.entry.name, {})

    def prepared_for(self, name: str) -> dict:
        """Another stage's share (e.g. an input's model, to ask it for its stored shapes)."""
        return self.prepared_by_stage.setdefault(name, {})

    @contextlib.contextmanager
    def cluster_session(self) -> Iterator[Any]:
        """The run's cluster session, or (a stage called on its own) one closed after the block::

            with ctx.cluster_session() as cluster:
                outcomes = cluster.run_tasks(pool_unit, tasks, log=ctx.log, work_bytes=nbytes)
        """
        if self.cluster is not None:
            yield self.cluster
            return
        from pipeline.cluster.session import ClusterSession

        with ClusterSession(self.workflow.cluster, log=self.log) as session:
            yield session

    def base_attrs(self) -> dict:
        """Attrs every output carries: stage kind, name, hash, config, input hashes."""
        return {
            "stage": self.entry.kind,
            "stage_name": self.entry.name,
            "stage_hash": self.stage_hash,
            "config": config_dict(self.entry.config, self.workflow.base_dir),
            "inputs": {k: str(v) if not isinstance(v, tuple) else [str(p) for p in v] for k, v in self.inputs.items()},
            "workflow": str(self.workflow.file),
            "identity": self.identity,
        }

    def log(self, message: str) -> None:
        print(f"[{self.entry.name}] {message}", file=sys.stderr, flush=True)

    def check_same_config(self) -> None:
        """Refuse to add to an output that another config (another stage hash) wrote."""
        from pipeline.store import layout as store

        existing = store.read_attrs(self.output)
        if existing is None or existing.get("stage_hash") != self.stage_hash:
            raise StoreError(f"{self.output} was written by another config; "
                             "re-run with --force to replace it, or set another 'output:'")

    # -- for stages that write a results folder of finished tasks (probe, cka) ------
    def open_results_output(self) -> TaskResults:
        """Create the results group (``complete: False``) or check an existing one is ours;
        the returned cache holds the tasks an interrupted run already finished."""
        import zarr

        from pipeline.store import layout as store
        from pipeline.store.location import zarr_store

        if store.read_attrs(self.output) is None:
            group = zarr.open_group(zarr_store(self.output), mode="w-", zarr_format=3)
            group.attrs[store.ATTR_KEY] = self.base_attrs() | {"complete": False}
        self.check_same_config()
        return TaskResults(self.output / "tasks", stage=self.entry.kind)

    # -- for stages that write a unit-based store (extract, classify, pool) ---------
    def pending_units(self, n_units: int) -> list[int]:
        """Units of this process's ``--shard`` share that are not done yet, after checking
        the existing store was created by this very config."""
        from pipeline.store import layout as store

        self.check_same_config()
        done = store.unit_status(self.output)
        return [u for u in store.assigned_units(n_units, self.shard) if not done[u]]

    def check_same_samples(self, image_ids: list[str]) -> None:
        """Refuse to write into a store whose rows belong to other images.

        ``image_ids`` is the run's per-row id list. The stage hash already holds the
        dataset's identity; this is the last guard before any row is written.
        """
        import numpy as np

        from pipeline.store.layout import STRINGS, open_root
        from pipeline.workflow.identity import first_difference

        stored = np.asarray(open_root(self.output)["image_id"][:]).astype(STRINGS)
        current = np.asarray(image_ids, dtype=STRINGS)
        if len(stored) != len(current) or not (stored == current).all():
            raise StoreError(f"{self.output}: the dataset changed since this store was written: "
                             f"{first_difference(stored.tolist(), current.tolist()) or 'labels differ'}; "
                             "re-run with --force to replace it, or set another 'output:'")

    def unit_claims(self):
        """Units taken one at a time under a lease (see ``pipeline.workflow.claims``)."""
        from pipeline.workflow.claims import Claims, UnitClaims

        if self.claims is None:
            self.claims = Claims(self.output).start()
        return UnitClaims(self.claims, f"stage {self.entry.name}{self.shard_note()}", log=self.log)

    def report_skipped(self, computed: int, units) -> None:
        """After a run: refuse if every pending unit was held by another live process,
        else say which units another process is still computing."""
        self.log(f"{computed} unit(s) computed by this process{self.shard_note()}")
        if units is None or not units.skipped:
            return
        unit, holder = next(iter(units.skipped.items()))
        who = holder.describe(units.claims.timeout)
        if computed == 0:
            raise StoreError(
                f"stage {self.entry.name!r}: all {len(units.skipped)} pending unit(s) of {self.output} are "
                f"being computed by another process, e.g. unit {unit} by {who}; nothing to do here "
                f"(a dead holder's lease expires after {units.claims.timeout:.0f} s)")
        self.log(f"{len(units.skipped)} unit(s) are being computed by another process (unit {unit}: {who}); "
                 "the store completes when it finishes")

    def shard_note(self) -> str:
        return f" in shard {self.shard[0]}/{self.shard[1]}" if self.shard[1] > 1 else ""

    def finalize_store(self) -> None:
        """Consolidate + stamp complete once every unit is done; report masked images."""
        from pipeline.store import layout as store

        if store.finalize(self.output):
            from pipeline.store.failures import count_failed_images, read_failed_images

            n_failed = count_failed_images(store.read_attrs(self.output))
            if n_failed:
                first = read_failed_images(self.output, limit=1)[0]
                self.log(f"{n_failed} image(s) could not be read and are masked (done=2); "
                         f"first: {first['image_id']}: {first['reason']}")
        elif self.shard[1] > 1:
            self.log("this shard is done; the store completes when every shard has finished")


class TaskResults:
    """Results of finished dask tasks, one JSON file per task, so a rerun resumes.

    Files are written whole (temp file + rename), so a kill leaves either the old
    state or the new result, never half a file.
    """

    def __init__(self, folder: Path, stage: str = "results"):
        from pipeline.store.location import as_location

        self.folder = as_location(folder)
        self.stage = stage  # names its kill point (``pipeline.faults``): ``<stage>:task:save``

    def path(self, name: str) -> Path:
        return self.folder / (name.replace("/", "__") + ".json")

    def load(self, name: str) -> Any | None:
        """The saved result of task ``name``, or None."""
        path = self.path(name)
        return json.loads(path.read_text()) if path.exists() else None

    def save(self, name: str, result: Any) -> None:
        from pipeline.store.location import is_remote

        path = self.path(name)
        if is_remote(path):  # an object PUT is atomic already
            path.write_text(json.dumps(result, default=float))
            return
        from pipeline.faults import kill_point

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(result, default=float))
                f.flush()
                os.fsync(f.fileno())  # a finished task survives a power cut once it is in the cache
            kill_point(f"{self.stage}:task:save")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not leave half a file behind
            raise


def prepared_value(prepared: dict | None, key: Any, build: Callable[[], Any]) -> Any:
    """``prepared[key]``, built by ``build()`` the first time (always built when ``prepared`` is None).

    How a stage reuses what the runner's hashing and ``validate`` built (``RunContext.prepared``):
    a key names the object fully, e.g. ``("model", "cpu", "float32")``, so ``run`` finds
    it only when it would build the very same thing.
    """
    if prepared is None:
        return build()
    if key not in prepared:
        prepared[key] = build()
    return prepared[key]


def without_listing(prepared: dict) -> dict:
    """``prepared`` without the dataset reader, for a stage's ``run``: a store's rows are
    positions in the dataset's listing, so ``run`` lists the dataset again (a file removed
    since the run's hashing must be refused before a row is written, not read as missing);
    hashing and ``validate``, at the start of the run, share one listing."""
    return {k: v for k, v in prepared.items() if k != "reader"}


def input_field(**kwargs):
    """A config field that names an earlier stage (its output becomes an input)."""
    return field(metadata={"input": True}, **kwargs)


class Stage:
    """Base class for stages; one instance per run."""

    kind: ClassVar[str] = "base"
    Config: ClassVar[type]
    output_suffix: ClassVar[str] = ".zarr"
    #: Whether ``--shard i/N`` splits this stage's units between processes.
    #: Stages that run on a dask cluster (or write one small result) take no shard.
    shardable: ClassVar[bool] = False

    def fingerprint(self, cfg: Any, base_dir: Path) -> dict:
        """Extra content for the hash that the config alone does not capture (e.g. weights)."""
        return {}

    def dataset_records(self, cfg: Any, prepared: dict | None = None) -> list | None:
        """The ordered dataset records a stage computes rows for (extract, classify), or None.

        Their identity (``pipeline.workflow.identity``) joins the stage hash: a store's
        rows are positions in this list. ``prepared`` (``RunContext.prepared``) may keep
        the opened dataset for ``validate`` and ``run``."""
        return None

    def validate(self, cfg: Any, ctx: RunContext) -> None:
        """Raise the DiffprobeError ``run`` would raise for ``cfg``, without computing.

        Called by ``run --dry-run`` and by the runner for every selected stage before
        the first one runs, so a bad later stage fails in seconds, not after the earlier
        stages' work. Checks only what is knowable now: a model may be built on the CPU
        (block names, timestep range, class embeddings); inputs not yet written are not read.
        What it builds that ``run`` can use as it is goes into ``ctx.prepared``.
        """

    def stored_shapes(self, cfg: Any, prepared: dict | None = None) -> dict[str, tuple[int, ...]] | None:
        """{block: (C, H, W)} of the maps ``cfg`` will store, known before running (for
        a later stage's ``validate``), or None where the stage cannot say. ``prepared``:
        this stage's ``RunContext.prepared``, when the caller has it."""
        return None

    def planned_shape(self, cfg: Any, entry: Any, workflow: Any, prepared_by_stage: dict | None = None) -> Any:
        """The ``pipeline.estimate.StoreShape`` of the store ``cfg`` will write, known before
        it runs (for a later stage's ``validate``, or its time estimate in ``diffprobe plan``),
        or None where the stage cannot say. ``entry`` / ``workflow``: this stage's entry and
        its workflow. ``prepared_by_stage``: the run's :attr:`RunContext.prepared_by_stage`,
        when the caller has it: what the stages' ``validate`` built (a model, a dataset
        listing) is reused, and nothing is added to it."""
        return None

    def run(self, cfg: Any, ctx: RunContext) -> None:
        raise NotImplementedError

    def results_bytes(self, cfg: Any, ctx: RunContext) -> int | None:
        """About how many bytes a results output (probe, cka) takes in all, for the one line of a
        full disk (``pipeline.store.space``); None where the stage cannot say. Unit stores need
        no estimate: their done units show what the rest will take."""
        return None

    def plan(self, cfg: Any, ctx: RunContext) -> list[tuple[str, str]]:
        """Rows (label, value) for ``diffprobe plan``."""
        return []
