"""Fault injection for tests, in one place: production code only passes through here.

Hooks, each off unless its environment variable is set:

- ``DIFFPROBE_FAULT_FAIL_TASKS="name[:n],..."``: task ``name`` of :func:`run_tasks`
  fails its first ``n`` attempts (default 1). :func:`run_attempt` wraps every task a
  stage submits, so payloads carry only their work.
- ``DIFFPROBE_FAULT_KILL_AFTER_UNITS=N``: the process SIGKILLs itself after its unit
  writer has written N units (how the tests kill a run mid-way, at a known point).
- ``DIFFPROBE_FAULT_UNIT_DELAY=S``: extract, classify and pool sleep S seconds before computing
  each unit (so tests can run two processes on one output at the same time).
- ``DIFFPROBE_FAULT_KILL_AT=point``: the process SIGKILLs itself when it reaches the
  named point (:func:`kill_point`). The points:

  ``schema:build``            inside the temp folder of a schema being built;
  ``finalize:consolidate``    a unit store's final attrs written, metadata not consolidated;
  ``finalize:stamp``          consolidated, not yet stamped ``complete``;
  ``<stage>:task:save``       (probe, cka) a finished task's result written to its temp
                              file, not yet renamed into the task cache;
  ``<stage>:results:write``   (probe, cka) CSV and figures written, the results Dataset not;
  ``<stage>:results:consolidate``  the Dataset written, metadata not consolidated;
  ``<stage>:results:stamp``   consolidated, not yet stamped ``complete``.
- ``DIFFPROBE_FAULT_STALL_AT=point:S``: the process stalls S seconds the first time it
  reaches the named point (:func:`stall_point`), heartbeats included, as a frozen
  process or a paused VM would; e.g. ``unit:before-done`` (a unit's data is written,
  its ``done`` not yet), so another process can take its lease over meanwhile.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

FAIL_TASKS_ENV = "DIFFPROBE_FAULT_FAIL_TASKS"
KILL_AFTER_UNITS_ENV = "DIFFPROBE_FAULT_KILL_AFTER_UNITS"
UNIT_DELAY_ENV = "DIFFPROBE_FAULT_UNIT_DELAY"
KILL_AT_ENV = "DIFFPROBE_FAULT_KILL_AT"
STALL_AT_ENV = "DIFFPROBE_FAULT_STALL_AT"

_stalled = threading.Event()
_stalls_done: set[str] = set()


def injected_failures(name: str) -> int:
    """How many attempts of task ``name`` :data:`FAIL_TASKS_ENV` makes fail (read in the client)."""
    spec = os.environ.get(FAIL_TASKS_ENV, "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        task, sep, count = item.rpartition(":")
        if not (sep and count.isdigit()):
            task, count = item, "1"
        if task == name:
            return int(count)
    return 0


def run_attempt(fn: Callable[[Any], Any], payload: Any, name: str, attempt: int, fail: bool) -> Any:
    """What a worker runs for one attempt of a task: ``fn(payload)``, or the injected fault."""
    if fail:
        raise RuntimeError(f"injected fault in task {name!r}, attempt {attempt} ({FAIL_TASKS_ENV})")
    return fn(payload)


def with_kill_after_units(write: Callable[..., None]) -> Callable[..., None]:
    """``write`` itself, or (under :data:`KILL_AFTER_UNITS_ENV`) one that kills the process after N calls."""
    limit = os.environ.get(KILL_AFTER_UNITS_ENV)
    if not limit:
        return write
    count = {"written": 0}

    def write_then_maybe_die(*args, **kwargs):
        write(*args, **kwargs)
        count["written"] += 1
        if count["written"] >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)

    return write_then_maybe_die


def unit_delay() -> None:
    """Sleep :data:`UNIT_DELAY_ENV` seconds (if set) before a unit is computed."""
    delay = os.environ.get(UNIT_DELAY_ENV)
    if delay:
        import time

        time.sleep(float(delay))


def kill_point(point: str) -> None:
    """SIGKILL this process if :data:`KILL_AT_ENV` names ``point`` (a no-op otherwise)."""
    if os.environ.get(KILL_AT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def stall_point(point: str) -> None:
    """Stall here (once per process) if :data:`STALL_AT_ENV` names ``point``; :func:`stalled` meanwhile."""
    name, _, seconds = os.environ.get(STALL_AT_ENV, "").rpartition(":")
    if name != point or point in _stalls_done:
        return
    import time

    _stalls_done.add(point)
    _stalled.set()
    try:
        time.sleep(float(seconds))
    finally:
        _stalled.clear()


def stalled() -> bool:
    """Whether this process is inside an injected stall (its heartbeats must stop too)."""
    return _stalled.is_set()


#: The kill points a results stage (``probe``, ``cka``) passes, in order (``<stage>:`` prefixed).
RESULTS_KILL_POINTS = ("task:save", "results:write", "results:consolidate", "results:stamp")
