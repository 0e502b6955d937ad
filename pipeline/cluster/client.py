"""Dask clients from a workflow's ``cluster:`` section, and running stage tasks on them.

``get_client(cfg)`` is a context manager that yields a ``distributed.Client`` and
always tears down what it started::

    with get_client(workflow.cluster, log=ctx.log) as client:
        outcomes = run_tasks(client, pool_unit, tasks, log=ctx.log)

Stages do not call it themselves: they run tasks through the run's
``pipeline.cluster.session.ClusterSession``, which starts one cluster for the whole
run, at the first stage that needs one, and runs small work in this process (see
there for the rule, ``n_workers: 0`` and ``in_process_mib``).

Kinds (``pipeline.workflow.config.ClusterConfig``):

- ``local``: a ``LocalCluster`` of ``n_workers`` processes with ``threads_per_worker``
  threads and ``memory_limit`` each;
- ``address``: connect to a running ``dask scheduler`` (``tcp://host:8786``, or an
  in-process cluster's address in tests); nothing is started or stopped;
- ``slurm``: ``dask_jobqueue.SLURMCluster(**cfg.slurm)`` scaled to ``n_workers``
  (needs the ``slurm`` extra: ``pip install diffprobe[slurm]``).

Every worker gets zarr's ``async.concurrency`` set to :data:`ZARR_CONCURRENCY`: the
default (10) per call, times several threads per worker, oversubscribes I/O. (A probe's
streamed reads issue a window's slab reads together, ``source.READ_CONCURRENCY`` at a
time, each one chunk: this per-call limit does not slow them.)

:func:`run_tasks` submits one task per payload and resubmits a failed one once
(rather than dask's ``retries=1``, which would hide the first attempt's error): the
outcome of every task, first error included, goes back to the stage, so a failed
cell is reported and never silently dropped. A full, read-only or forbidden output
(``pipeline.errors.is_storage_error``) is not retried: its OSError is raised at once,
and the runner turns it into its one line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import dask
from distributed import Client, LocalCluster, as_completed
from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.workflow.config import ClusterConfig
from pipeline import faults
from pipeline.cluster.slurm import NEUTRAL_CWD, with_run_job_name
from pipeline.cluster.identity import check_workers
from pipeline.cluster.tasks import ZARR_CONCURRENCY, TaskOutcome, failed_attempt
from pipeline.errors import ConfigError

#: Set in SLURM job scripts: non-daemonic workers (see ``_start_cluster``).
SLURM_WORKER_ENV = "export DASK_DISTRIBUTED__WORKER__DAEMON=False"


class ZarrConcurrency(WorkerPlugin):
    """Set zarr's per-call I/O concurrency on every worker, including ones that join later."""

    def __init__(self, concurrency: int = ZARR_CONCURRENCY):
        self.concurrency = concurrency

    def setup(self, worker) -> None:
        import zarr

        zarr.config.set({"async.concurrency": self.concurrency})


class IgnoreSigint(WorkerPlugin):
    """Workers ignore SIGINT: a terminal's Ctrl-C reaches the whole process group, and the
    client stops the workers itself (otherwise each prints a traceback of its own)."""

    def setup(self, worker) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _start_cluster(cfg: ClusterConfig):
    """The cluster object this process owns (None for ``address``)."""
    if cfg.kind == "local":
        if cfg.n_workers < 1 or cfg.threads_per_worker < 1:
            raise ConfigError(
                f"cluster.n_workers must be >= 1 (or 0: every task in this process) and "
                f"cluster.threads_per_worker >= 1; got {cfg.n_workers}, {cfg.threads_per_worker}"
            )
        # Non-daemonic worker processes may fork the probe's block-reader helper
        # (pipeline/store/prefetch.py); daemonic ones fall back to a reader thread.
        with dask.config.set({"distributed.worker.daemon": False}):
            return LocalCluster(
                n_workers=cfg.n_workers,
                threads_per_worker=cfg.threads_per_worker,
                memory_limit=cfg.memory_limit,
                processes=True,
                # A free port: the scheduler's HTTP server (health, metrics) starts even
                # without a dashboard, and a fixed 8787 collides with other clusters.
                dashboard_address=":0",
                scheduler_kwargs={"dashboard": cfg.dashboard},
                silence_logs=logging.ERROR,
            )
    if cfg.kind == "address":
        if not cfg.address:
            raise ConfigError(
                "cluster kind 'address' needs cluster.address, e.g. tcp://10.0.0.5:8786 "
                "(the address `dask scheduler` prints)"
            )
        return None
    if cfg.kind == "slurm":
        from pipeline.interrupts import keep_handlers

        try:
            # dask_jobqueue's import replaces SIGINT's handler with sys.exit() (exit status 0
            # after Ctrl-C); keep ours, which stops the run with 130.
            with keep_handlers():
                from dask_jobqueue import SLURMCluster
        except ImportError:
            raise ConfigError(
                "cluster kind 'slurm' needs dask-jobqueue: pip install diffprobe[slurm]"
            ) from None
        options = dict(cfg.slurm)
        # A neutral working directory first (a user's prologue may still cd elsewhere),
        # then worker processes that may fork the probe's block-reader helper (the batch
        # job's cgroup ends them with the job either way).
        options["job_script_prologue"] = [*NEUTRAL_CWD, *options.get("job_script_prologue", []),
                                          SLURM_WORKER_ENV]
        try:
            cluster = SLURMCluster(**with_run_job_name(options))
        except TypeError as exc:
            raise ConfigError(f"cluster.slurm: {exc} (keys are SLURMCluster's arguments)") from None
        return cluster
    raise ConfigError(f"unknown cluster kind {cfg.kind!r}; valid: local, address, slurm")


@contextlib.contextmanager
def get_client(cfg: ClusterConfig, log: Callable[[str], None] | None = None) -> Iterator[Client]:
    """A dask client for ``cfg``; prints the dashboard link; closes what it started.

    Parameters
    ----------
    cfg : ClusterConfig
    log : callable, optional
        Where to print the dashboard link and cluster notes (default: stderr).
    """
    log = log or _stderr
    cluster = _start_cluster(cfg)
    watch = None
    restore = _exit_on_sigterm() if cfg.kind == "slurm" else None
    try:
        if cfg.kind == "slurm":
            from pipeline.cluster.slurm import SlurmWorkers

            watch = SlurmWorkers(cluster, cfg.n_workers, cfg.slurm_wait_s, cfg.slurm_replacements, log,
                                 orphan_s=cfg.slurm_orphan_s)
            watch.preflight()
            watch.start()
        try:
            client = Client(cluster if cluster is not None else cfg.address, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(
                f"cannot reach the dask scheduler at {cfg.address}: {exc}; start one with "
                "`dask scheduler` (and workers with `dask worker ADDRESS`) or fix cluster.address"
            ) from None
        try:
            client.register_plugin(ZarrConcurrency(), name="diffprobe-zarr-concurrency")
            if cluster is not None:  # workers we started; an external cluster's are its own
                client.register_plugin(IgnoreSigint(), name="diffprobe-ignore-sigint")
            where = cfg.address if cluster is None else cfg.kind
            if watch is not None:
                log(f"dask cluster (slurm): {cfg.n_workers} worker job(s) submitted")
                watch.wait(client)
                _WATCHES[id(client)] = watch
            else:
                check_workers(client)
            workers = len(client.scheduler_info(n_workers=-1).get("workers", {}))
            log(f"dask cluster ({where}): {workers} worker(s)")
            if cfg.dashboard and client.dashboard_link:
                if importlib.util.find_spec("bokeh") is None:
                    log("dask dashboard: not served (pip install bokeh to get one)")
                else:
                    log(f"dask dashboard: {client.dashboard_link}")
            yield client
        finally:
            _WATCHES.pop(id(client), None)
            client.close()
    finally:
        try:
            if cluster is not None:
                cluster.close()
        finally:
            if watch is not None:
                left = watch.cancel_all()
                if left:
                    log(f"cancelled SLURM worker job(s) {' '.join(left)} left after closing the cluster")
            if restore is not None:
                restore()


#: Watches of the SLURM clients open now, by ``id(client)``: ``run_tasks`` polls them.
_WATCHES: dict[int, Any] = {}


def _exit_on_sigterm() -> Callable[[], None] | None:
    """Make SIGTERM unwind the stack (so worker jobs are cancelled); returns the undo, or None.

    Python's default SIGTERM ends the process without running ``finally`` blocks, which
    would leave the worker jobs queued until their walltime.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        return None  # someone (the CLI) already handles it

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _completed(queue, client: Client):
    """Futures of ``queue`` as they finish; polls the client's SLURM watch in between, if any."""
    watch = _WATCHES.get(id(client))
    if watch is None:
        yield from queue
        return
    while not queue.is_empty():
        batch = queue.next_batch(block=False)
        if not batch:
            watch.check(client)
            time.sleep(0.2)
            continue
        yield from batch


def _result(future, client: Client):
    """``future.result()``, polling the SLURM watch while it waits.

    A finished future whose data lived on a worker that is gone is recomputed by
    ``result()``; without workers that would wait for ever.
    """
    watch = _WATCHES.get(id(client))
    if watch is None:
        return future.result()
    while True:
        try:
            return future.result(timeout=2)
        except TimeoutError:
            if future.status == "error":
                raise  # the task's own TimeoutError
            watch.check(client)


# ----------------------------------------------------------------- tasks


def run_tasks(
    client: Client,
    fn: Callable[[Any], Any],
    payloads: Sequence[Any],
    *,
    log: Callable[[str], None] | None = None,
    on_result: Callable[[Any, Any, int], None] | None = None,
) -> list[TaskOutcome]:
    """Run ``fn(payload)`` on the cluster for each payload; retry a failed one once.

    Parameters
    ----------
    client : distributed.Client
    fn : callable
        A module-level function (workers import it by name).
    payloads : sequence of frozen dataclasses with a unique ``name``
        Small: paths and selectors only, never arrays.
    log : callable, optional
        Receives one line per failure and retry.
    on_result : callable(payload, result, attempts), optional
        Called in this process as each task finishes (e.g. to save it for resume).

    Returns
    -------
    One :class:`TaskOutcome` per payload, in input order.
    """
    log = log or _stderr
    outcomes = {p.name: TaskOutcome(p.name) for p in payloads}
    if len(outcomes) != len(payloads):
        raise ValueError("task names must be unique")  # a diffprobe bug, not user input
    pending: dict[str, Any] = {}
    queue = as_completed()

    failing = {p.name: faults.injected_failures(p.name) for p in payloads}

    def submit(payload, attempt: int):
        key = f"{fn.__name__}-{payload.name}-a{attempt}-{uuid.uuid4().hex[:8]}"
        future = client.submit(faults.run_attempt, fn, payload, payload.name, attempt,
                               attempt <= failing[payload.name], key=key, pure=False)
        pending[future.key] = (payload, attempt)
        queue.add(future)

    for payload in payloads:
        submit(payload, 1)
    for future in _completed(queue, client):
        payload, attempt = pending.pop(future.key)
        outcome = outcomes[payload.name]
        outcome.attempts = attempt
        try:
            result = _result(future, client)
        except Exception as exc:  # any task error is reported, then retried once
            if failed_attempt(outcome, exc, attempt, log):
                submit(payload, attempt + 1)
            continue
        finally:
            future.release()
        outcome.result = result
        if outcome.first_error:
            log(f"task {payload.name} succeeded on retry")
        if on_result is not None:
            on_result(payload, result, attempt)
    return [outcomes[p.name] for p in payloads]
