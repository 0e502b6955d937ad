"""Windows of rows gathered from a :class:`~pipeline.store.source.ZarrSource`'s slabs, built ahead.

A streamed pass over a store is cut into *windows* of about a quarter of the
source's buffer: a :class:`WindowPlan` lists, per slab, which rows of the slab go
to which rows of the window (a shuffled pass scatters them through a seeded
permutation, an ordered pass keeps them in order). While the consumer serves one
window, the next is read and decoded by a *builder*:

- :class:`ProcessBuilder`: a forked helper process that reads the slabs and fills
  the window into one of two shared-memory segments. zarr-python's read path is
  mostly Python (asyncio, the sharding index, crc32c under the GIL): in a thread
  it holds the GIL for ~60 % of its time, and training beside it took 1.39x as
  long; beside the same reads in a process, 1.17x (benchmarks/reader_contention.py,
  results in benchmarks/RESULTS.md).
- :class:`ThreadBuilder`: the same work in a thread, for processes that may not
  fork children (dask's nanny starts workers as daemonic processes) and for
  platforms without ``fork``.

Both run :func:`fill_window`, and plans carry their permutations, so the two give
identical windows. torch's ``DataLoader`` would fork a worker per pass (~40 ms each,
a dozen passes per head group) and cannot take a new plan into a persistent worker;
hence this small pool of one.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import queue
import threading
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import StoreError

#: Force a builder kind: ``thread`` or ``process`` (default: process where allowed).
BUILDER_ENV = "DIFFPROBE_WINDOW_READER"

#: ``read(runs, keys)``: for each ``(first, last)`` run of slabs, ``{key: rows of slabs first..last}``.
ReadRuns = Callable[[Sequence[tuple[int, int]], Sequence[str]], list]


@dataclass(frozen=True)
class WindowPlan:
    """Rows of one window: ``pieces`` of (first slab, last slab, rows within them, rows within the window).

    ``reads`` groups the pieces (by index) that are read together, concurrently: the
    source bounds a group by the bytes its slabs decode to. Default: one group of all.
    """

    pieces: tuple[tuple[int, int, np.ndarray, np.ndarray], ...]
    n_rows: int
    reads: tuple[tuple[int, ...], ...] | None = None


def fill_window(read_runs: ReadRuns, plan: WindowPlan, keys: Sequence[str],
               out: dict[str, np.ndarray]) -> None:
    """Read each run of slabs of ``plan`` once (a group of runs at a time, concurrently) and
    scatter its rows into ``out[key][:plan.n_rows]``."""
    groups = plan.reads if plan.reads is not None else (tuple(range(len(plan.pieces))),)
    for group in groups:
        pieces = [plan.pieces[i] for i in group]
        for (_, _, local, dest), data in zip(pieces, read_runs([(p[0], p[1]) for p in pieces], keys)):
            for key in keys:
                out[key][dest] = data[key][local]


def process_allowed() -> bool:
    """Whether this process may fork a helper (not a daemonic multiprocessing child)."""
    choice = os.environ.get(BUILDER_ENV, "").strip().lower()
    if choice not in ("", "thread", "process"):
        raise StoreError(f"{BUILDER_ENV} must be 'thread' or 'process'; got {choice!r}")
    if choice == "thread" or "fork" not in multiprocessing.get_all_start_methods():
        return False
    return not multiprocessing.current_process().daemon


def in_background(items: Iterator, alive: int) -> Iterator:
    """Iterate ``items`` in a daemon thread, at most ``alive`` items built, queued or in use.

    The producer takes a token before building an item; the consumer gives the
    previous item's token back when it asks for the next one, so memory stays at
    ``alive`` items however far ahead the producer could run. An exception raised
    while producing is re-raised here; closing this generator early stops the thread.
    (``concurrent.futures`` bounds queued *tasks*, not live results, hence by hand.)
    """
    results: queue.Queue = queue.Queue()
    tokens = threading.Semaphore(alive)
    stop = threading.Event()

    def work() -> None:
        try:
            while True:
                while not tokens.acquire(timeout=0.05):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                try:
                    item = next(items)
                except StopIteration:
                    results.put((False, None))
                    return
                results.put((True, item))
                del item
        except BaseException as exc:  # handed to the consumer, which re-raises it
            results.put((False, exc))

    thread = threading.Thread(target=work, name="zarr-source", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = results.get()
            if not ok:
                if item is not None:
                    raise item
                return
            yield item
            del item
            tokens.release()
    finally:
        stop.set()
        tokens.release()
        thread.join()


class ThreadBuilder:
    """Builds windows in one background thread; each window is a fresh array."""

    def __init__(self, read_runs: ReadRuns, row_shape: tuple[int, ...], dtype):
        self.read_runs, self.row_shape, self.dtype = read_runs, row_shape, np.dtype(dtype)

    def windows(self, plans: Sequence[WindowPlan], keys: Sequence[str],
               ahead: Sequence[WindowPlan] = ()) -> Iterator[dict[str, np.ndarray]]:
        """Serve ``plans`` in order (``ahead`` is ignored: a thread builds nothing ahead)."""

        def build(plan: WindowPlan) -> dict[str, np.ndarray]:
            out = {k: np.empty((plan.n_rows, *self.row_shape), dtype=self.dtype) for k in keys}
            fill_window(self.read_runs, plan, keys, out)
            return out

        yield from in_background(map(build, plans), alive=2)

    def close(self) -> None:
        pass


def _child_of(job: list) -> None:
    """Process target: unpack the forked copy of the job list (the parent empties its own)."""
    _child(*job)


def _child(conn, read_runs: ReadRuns, segments: list[mmap.mmap], row_shape, dtype) -> None:
    """The helper's loop: ``(slot, plan, keys)`` in, ``None`` or an error text out; ``None`` in ends it."""
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent went away
            return
        if job is None:
            return
        slot, plan, keys = job
        try:
            fill_window(read_runs, plan, keys, _views(segments[slot], keys, row_shape, dtype))
            conn.send(None)
        except BaseException:  # reported to the parent, which raises it as a StoreError
            conn.send(traceback.format_exc(limit=4).strip().splitlines()[-1])


def _views(segment: mmap.mmap, keys, row_shape, dtype) -> dict[str, np.ndarray]:
    """Per-key ``(capacity, *row_shape)`` arrays laid end to end in ``segment``."""
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    capacity = len(segment) // (row_bytes * len(keys))
    return {k: np.ndarray((capacity, *row_shape), dtype=dtype, buffer=segment,
                          offset=i * capacity * row_bytes) for i, k in enumerate(keys)}


class ProcessBuilder:
    """Builds windows in a forked helper process into two shared-memory segments.

    The segments are anonymous shared mappings made before the fork: nothing is
    named in ``/dev/shm``, so nothing can leak there if either process is killed.

    Each segment holds ``nbytes`` (a window of every key asked). Windows are served as
    views of the segment until the consumer asks for the next one, when the helper
    may overwrite it: consumers copy what they keep (``ZarrSource`` yields copies).
    """

    def __init__(self, read_runs: ReadRuns, row_shape: tuple[int, ...], dtype, nbytes: int):
        self.row_shape, self.dtype = row_shape, np.dtype(dtype)
        nbytes = max(int(nbytes), int(np.prod(row_shape)) * self.dtype.itemsize)
        self.segments = [mmap.mmap(-1, nbytes) for _ in range(2)]  # MAP_SHARED | MAP_ANONYMOUS
        ctx = multiprocessing.get_context("fork")
        self.conn, child_conn = ctx.Pipe()
        # The arguments travel in a list that is emptied once the child has forked its
        # copy: the parent's Process object (which multiprocessing keeps until reaped)
        # must not keep the source alive through read_runs.
        job = [child_conn, read_runs, self.segments, row_shape, self.dtype]
        self.process = ctx.Process(target=_child_of, name="diffprobe-window-reader", daemon=True, args=(job,))
        self.process.start()
        job.clear()
        child_conn.close()
        self._finalizer = weakref.finalize(self, _shutdown, self.conn, self.process, self.segments)
        self._ahead: tuple[list[WindowPlan], int, list[str]] | None = None

    def _wait(self) -> str | None:
        """The helper's reply to the oldest job sent: None when done, else the error's text."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise self._died() from None

    def _send(self, job) -> None:
        try:
            self.conn.send(job)
        except OSError:
            raise self._died() from None

    def _died(self) -> StoreError:
        self.process.join(timeout=1)
        return StoreError(f"the window reader process died (exit code {self.process.exitcode}); "
                          f"set {BUILDER_ENV}=thread to read in this process")

    @staticmethod
    def _check(error: str | None) -> None:
        if error is not None:
            raise StoreError(f"reading the store failed in the window reader: {error}")

    def windows(self, plans: Sequence[WindowPlan], keys: Sequence[str],
               ahead: Sequence[WindowPlan] = ()) -> Iterator[dict[str, np.ndarray]]:
        """Serve ``plans`` in order; once done, start building ``ahead[:2]`` (same keys).

        ``ahead`` is a guess at the next pass's first windows (the next epoch of a
        shuffled pass): if the next call's plans start with those very objects, they
        are ready or under way; otherwise they are waited for and dropped.
        """
        keys = list(keys)
        sent = done = base = 0
        try:
            if self._ahead is not None:
                guesses, slot, guess_keys = self._ahead
                self._ahead = None
                if guess_keys == keys and len(plans) >= len(guesses) and all(
                        p is g for p, g in zip(plans, guesses)):
                    sent, base = len(guesses), slot
                else:
                    for _ in guesses:  # a failed guess is not this pass's error
                        self._wait()
            for i, plan in enumerate(plans):
                if sent == i:
                    self._send(((base + i) % 2, plan, keys))
                    sent += 1
                error = self._wait()
                done += 1
                self._check(error)
                if sent < min(len(plans), i + 2):  # the next window fills the other segment meanwhile
                    self._send(((base + sent) % 2, plans[sent], keys))
                    sent += 1
                views = _views(self.segments[(base + i) % 2], keys, self.row_shape, self.dtype)
                yield {k: v[:plan.n_rows] for k, v in views.items()}
            guesses = list(ahead)[:2]
            if guesses:
                slot = (base + len(plans)) % 2
                for j, guess in enumerate(guesses):
                    self._send(((slot + j) % 2, guess, keys))
                self._ahead = (guesses, slot, keys)
        finally:
            for _ in range(sent - done):  # an abandoned pass: let the helper finish before reuse
                try:
                    self._wait()
                except StoreError:
                    break

    def close(self) -> None:
        self._finalizer()


def _shutdown(conn, process, segments) -> None:
    try:
        conn.send(None)
    except (OSError, ValueError):
        pass
    process.join(timeout=5)
    if process.is_alive():
        process.kill()
        process.join()
    conn.close()
    for seg in segments:
        try:
            seg.close()
        except BufferError:  # a caller still holds a view; the mapping goes with it
            pass
