"""One dask cluster for a whole run, started only when a stage's work is worth it.

A :class:`ClusterSession` belongs to one ``diffprobe run``: the runner opens it
around the stages and hands it to each of them (``RunContext.cluster``); a stage
called on its own gets a session of its own (``RunContext.cluster_session``). The
session starts nothing until a stage asks it to run tasks, so extract, classify and
report never pay for a cluster, and every dask stage of the run shares the one it
starts (starting a ``LocalCluster`` of two workers costs 3-9 s, and each worker
imports torch and the stage code once; see benchmarks/RESULTS.md, "Fixed cost").

**Where tasks run** (:meth:`ClusterSession.where`):

- ``cluster: {kind: local, n_workers: 0}``: always in this process, one task after
  the other (no dask at all);
- ``kind: local`` (with ``n_workers >= 1``): while no stage of the run has started the
  cluster, a stage whose work is *small* runs in this process: one task, or tasks that
  read at most ``cluster.in_process_mib`` MiB (default 256) in all. The stage says how
  much its tasks read where it knows (pool and cka do; a probe task's cost is
  training, not bytes, so a probe goes in-process only with a single task). Starting
  a cluster costs more than such work; once one is running, it costs nothing more, so
  every later stage uses it. ``in_process_mib: 0`` turns this off;
- ``address`` and ``slurm``: always on the cluster (the user chose where work runs).

In-process tasks keep the cluster's contract: the same ``pipeline.faults`` hooks,
one retry of a failed task with both errors reported, ``on_result`` after each
task, results in input order. An interruption (SIGINT / SIGTERM, raised in the main
thread by ``pipeline.interrupts``) is not a task failure: it stops the stage at once
and the run resumes from the finished tasks. They run without the workers' memory
limit, and with the main process's zarr concurrency set to the workers' cap
(``ZARR_CONCURRENCY``) for their duration.

May import: ``pipeline.cluster.tasks`` and the cluster config; dask only when a
cluster is started (``pipeline.cluster.client``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.cluster.tasks import TaskOutcome, run_in_process
from pipeline.workflow.config import ClusterConfig

class ClusterSession:
    """The run's dask client, opened at the first stage that needs one, closed once at the end.

    Use as a context manager (``with ClusterSession(cfg) as cluster:``); a stage calls
    :meth:`run_tasks`.
    """

    def __init__(self, cfg: ClusterConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self._stack = contextlib.ExitStack()
        self._client = None

    def __enter__(self) -> ClusterSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def started(self) -> bool:
        return self._client is not None

    def client(self, log: Callable[[str], None] | None = None):
        """The ``distributed.Client``, starting the cluster on first use (its notes go to ``log``)."""
        if self._client is None:
            from pipeline.cluster.client import get_client

            self._client = self._stack.enter_context(get_client(self.cfg, log=log or self.log))
        return self._client

    def where(self, n_tasks: int, work_bytes: int | None = None) -> str:
        """``"in-process"`` or ``"cluster"`` for a stage of ``n_tasks`` tasks reading ``work_bytes``
        in all (None: unknown; see the module docstring)."""
        cfg = self.cfg
        if cfg.kind != "local":
            return "cluster"
        if cfg.n_workers == 0:
            return "in-process"
        if self.started or cfg.in_process_mib <= 0:
            return "cluster"
        if n_tasks <= 1 or (work_bytes is not None and work_bytes <= cfg.in_process_mib * 2**20):
            return "in-process"
        return "cluster"

    def run_tasks(self, fn: Callable[[Any], Any], payloads: Sequence[Any], *,
                  log: Callable[[str], None] | None = None,
                  on_result: Callable[[Any, Any, int], None] | None = None,
                  work_bytes: int | None = None) -> list[TaskOutcome]:
        """Run ``fn(payload)`` for each payload, here or on the cluster (see :meth:`where`).

        Parameters and return value as :func:`pipeline.cluster.client.run_tasks`, plus
        ``work_bytes``: what the tasks read in all, where the stage knows (None otherwise).
        """
        log = log or self.log
        if not payloads:
            return []
        if self.where(len(payloads), work_bytes) == "in-process":
            why = "cluster.n_workers: 0" if self.cfg.n_workers == 0 else "small work: no dask cluster needed"
            log(f"{len(payloads)} task(s) in this process ({why})")
            return run_in_process(fn, payloads, log=log, on_result=on_result)
        from pipeline.cluster.client import run_tasks

        return run_tasks(self.client(log), fn, payloads, log=log, on_result=on_result)

    def close(self) -> None:
        """Close the client and whatever cluster this session started (idempotent)."""
        self._client = None
        self._stack.close()
