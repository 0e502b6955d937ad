"""What a task's run gives back, and running tasks in this process with a cluster's contract.

:class:`TaskOutcome` is what :func:`pipeline.cluster.client.run_tasks` (on dask) and
:func:`run_in_process` (here, one task after the other) return per task; both retry a
failed task once and report both errors, and both go through ``pipeline.faults`` so
tests inject the same failures either way. Nothing here imports dask.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import faults
from pipeline.errors import is_storage_error

#: Attempts per task: the first and one retry.
MAX_ATTEMPTS = 2
#: zarr ``async.concurrency`` on workers (4-8 when workers run many threads: each call's default of 10
#: concurrent requests, times the threads, oversubscribes the file system).
ZARR_CONCURRENCY = 4


@dataclass
class TaskOutcome:
    """What happened to one task: its result, or the error of its last attempt."""

    name: str
    result: Any = None
    error: str | None = None
    first_error: str | None = None  # set when the first attempt failed (retried)
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


def failed_attempt(outcome: TaskOutcome, exc: BaseException, attempt: int,
                   log: Callable[[str], None]) -> bool:
    """Record attempt ``attempt`` of a task as failed with ``exc``; True if it gets another.

    A storage error (a full or read-only output) is raised again instead: a retry cannot
    help, and the runner says so in one line. Called from the ``except`` of both paths."""
    if is_storage_error(exc):
        raise exc
    message = f"{type(exc).__name__}: {exc}"
    if attempt < MAX_ATTEMPTS:
        outcome.first_error = message
        log(f"task {outcome.name} failed ({message}); retrying once")
        return True
    outcome.error = message
    log(f"task {outcome.name} failed again ({message}); giving up on it")
    return False


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_in_process(fn: Callable[[Any], Any], payloads: Sequence[Any], *,
                   log: Callable[[str], None] | None = None,
                   on_result: Callable[[Any, Any, int], None] | None = None) -> list[TaskOutcome]:
    """``run_tasks``' contract in this process: ``fn(payload)`` for each, a failed one retried once.

    Parameters and return value as :func:`pipeline.cluster.client.run_tasks`.
    """
    import zarr

    log = log or _stderr
    outcomes = [TaskOutcome(p.name) for p in payloads]
    if len({o.name for o in outcomes}) != len(outcomes):
        raise ValueError("task names must be unique")  # a diffprobe bug, not user input
    with zarr.config.set({"async.concurrency": ZARR_CONCURRENCY}):
        for payload, outcome in zip(payloads, outcomes):
            failing = faults.injected_failures(payload.name)
            for attempt in range(1, MAX_ATTEMPTS + 1):
                outcome.attempts = attempt
                try:
                    result = faults.run_attempt(fn, payload, payload.name, attempt, attempt <= failing)
                except Exception as exc:  # noqa: BLE001 -- reported, then retried once (as on a cluster)
                    if failed_attempt(outcome, exc, attempt, log):
                        continue
                    break
                outcome.result = result
                if outcome.first_error:
                    log(f"task {payload.name} succeeded on retry")
                if on_result is not None:
                    on_result(payload, result, attempt)
                break
    return outcomes
