"""A BatchSource that streams one feature slice (:mod:`pipeline.store.slices`) of stores from Zarr.

:class:`ZarrSource` implements ``pipeline.probing.training.BatchSource`` over one slice of
one or more stores, its timesteps served as keys ``"t<t>"``. It reads *slabs*
(one inner chunk along ``sample``: a contiguous, chunk-aligned range of samples)
and holds at most about ``buffer_bytes`` of features:

- a slice (all its timesteps) that fits in ``buffer_bytes`` is decoded once and
  served from memory afterwards (a global shuffle per epoch): no pass re-reads;
- in a larger slice, a sample subset that fits in half the buffer (typically
  the validation and test splits) is decoded once and kept, so later passes
  over it cost no reads;
- other passes stream, cut into *windows* of about ``buffer_bytes / 4``: a
  shuffled pass visits slabs in a seeded random order, and each window (whole
  slabs) is scattered through its own seeded permutation (the usual shuffle
  buffer of streaming loaders: chunk-level + in-buffer randomness); an ordered
  pass keeps the order asked. A window's runs of slabs are read together, up to
  :data:`READ_CONCURRENCY` in flight in one call into zarr's event loop (on object
  storage each is a few round trips: one after another, they wait on latency). While
  one window is served, the next is read by a
  helper process (:mod:`pipeline.store.prefetch`; a thread where a process may not
  fork), and when a shuffled pass ends, the helper starts on the next epoch's
  first windows.

Memory: kept subsets up to half the buffer, streamed windows up to the other half
(two windows: one served, one being built), plus the slabs of one read group
being decoded (at most a quarter buffer, or one run of slabs), whatever the size of
the store. Shuffles depend only on (indices, seed, epoch) for
a given store and ``buffer_bytes``, not on the builder.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pipeline.store.prefetch import WindowPlan, ProcessBuilder, ThreadBuilder, in_background, process_allowed
from pipeline.errors import StoreError
from pipeline.store.slices import timestep_key, timestep_positions
from pipeline.store.checks import Integrity
from pipeline.store.layout import WRITTEN, open_root
from pipeline.store.location import is_remote

#: Default shuffle buffer / slab cache of a :class:`ZarrSource`.
DEFAULT_BUFFER_BYTES = 64 << 20
#: Most consecutive slabs of a streamed window read in one call.
RUN_SLABS = 4
#: Reads of one window in flight at once (each a run of slabs x one key).
READ_CONCURRENCY = 8


class _Part:
    """One store's array of a slice, with its per-sample coordinates."""

    def __init__(self, path: str | Path, array_path: str, timesteps: Sequence[int]):
        root = open_root(path)
        checks = Integrity(root, path)
        self.array = checks.array(array_path)  # reads name damaged chunks
        positions = timestep_positions(path, root["timestep"][:], timesteps)
        self.t_index = {int(t): i for t, i in zip(timesteps, positions)}
        self.n = int(self.array.shape[0])
        self.chunk = int(self.array.chunks[0])
        self.labels = root["label"][:].astype(np.int64)
        self.image_ids = np.asarray(root["image_id"][:], dtype=object)
        self.done = checks.done()
        checks.check_present([array_path])  # a done unit's shard is never read as NaN
        self.path = str(path)


class ZarrSource:
    """A :class:`~pipeline.probing.training.BatchSource` streaming one feature slice from Zarr.

    Parameters
    ----------
    parts : sequence of (store path, array path)
        Stores concatenated along samples: part 0 serves positions ``0 .. n0-1``,
        part 1 the next ``n1``, and so on (e.g. a train store and a test store).
        Every part must hold the same ``(C, p, p)`` maps and the timesteps asked for.
    timesteps : sequence of int
        Served under the keys ``"t<t>"`` (:func:`timestep_key`).
    buffer_bytes : int
        Memory for features: the whole slice if it fits, else the shuffle buffer
        (see the module docstring).

    Attributes
    ----------
    shapes : {key: (C, p, p)}
    labels, image_ids, done : (n,) arrays over all parts
    usable : (n,) bool
        ``done == 1``: written samples; failed (2) or pending (0) ones are never served.
    bytes_read : int
        Decoded bytes read so far (slabs x keys).
    peak_buffer_bytes : int
        Most bytes of slab data held at once.
    """

    def __init__(self, parts: Sequence[tuple[str | Path, str]], timesteps: Sequence[int], *,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES):
        if not parts:
            raise StoreError("a ZarrSource needs at least one (store, array) part")
        self.parts = [_Part(path, array_path, timesteps) for path, array_path in parts]
        shapes = {tuple(int(v) for v in p.array.shape[2:]) for p in self.parts}
        if len(shapes) != 1:
            raise StoreError(f"the stores' maps differ in shape: {sorted(shapes)}; probe like with like")
        self.map_shape = shapes.pop()
        self.timesteps = [int(t) for t in timesteps]
        self.shapes = {timestep_key(t): self.map_shape for t in self.timesteps}
        self.buffer_bytes = int(buffer_bytes)
        self.labels = np.concatenate([p.labels for p in self.parts])
        self.image_ids = np.concatenate([p.image_ids for p in self.parts])
        self.done = np.concatenate([p.done for p in self.parts])
        self.usable = self.done == WRITTEN
        self.offsets = np.cumsum([0] + [p.n for p in self.parts])
        starts, stops, owners = [], [], []
        for i, part in enumerate(self.parts):
            for s in range(0, part.n, part.chunk):
                starts.append(self.offsets[i] + s)
                stops.append(self.offsets[i] + min(s + part.chunk, part.n))
                owners.append(i)
        self.slab_start = np.asarray(starts, dtype=np.int64)
        self.slab_stop = np.asarray(stops, dtype=np.int64)
        self.slab_part = np.asarray(owners, dtype=np.int64)
        self.item_bytes = int(np.prod(self.map_shape)) * self.parts[0].array.dtype.itemsize
        self.bytes_read = 0
        self.peak_buffer_bytes = 0
        self._resident: dict[str, np.ndarray] | None = None
        self._memo: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._memo_bytes = 0
        self._window_builder: ProcessBuilder | ThreadBuilder | None = None
        self._next_pass: tuple[tuple, list] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def part_range(self, part: int) -> tuple[int, int]:
        """Sample positions ``[start, stop)`` served by ``parts[part]``."""
        return int(self.offsets[part]), int(self.offsets[part + 1])

    # ------------------------------------------------------------- reading

    def _read_slabs(self, first: int, last: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Rows of slabs ``first..last`` (consecutive, one part) in one read per key; not counted."""
        return self._read_runs([(first, last)], keys)[0]

    def _read_runs(self, runs: Sequence[tuple[int, int]], keys: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """:meth:`_read_slabs` of each ``(first, last)`` run, the reads of one store issued
        concurrently (:data:`READ_CONCURRENCY`); not counted."""
        out: list[dict[str, np.ndarray]] = [{} for _ in runs]
        by_part: dict[int, list[tuple[int, str, tuple]]] = {}
        for i, (first, last) in enumerate(runs):
            owner = int(self.slab_part[first])
            part = self.parts[owner]
            lo = int(self.slab_start[first] - self.offsets[owner])
            hi = int(self.slab_stop[last] - self.offsets[owner])
            for key in keys:
                by_part.setdefault(owner, []).append((i, key, (slice(lo, hi), part.t_index[int(key[1:])])))
        for owner, reads in by_part.items():
            got = self.parts[owner].array.read_many([sel for _, _, sel in reads], READ_CONCURRENCY)
            for (i, key, _), data in zip(reads, got):
                out[i][key] = data
        return out

    def _slabs_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.slab_start, indices, side="right") - 1

    def _check(self, indices, keys) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        unknown = [k for k in keys if k not in self.shapes]
        if unknown:
            raise StoreError(f"unknown slice key(s) {unknown}; this source serves {list(self.shapes)}")
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise StoreError(f"sample positions must lie in [0, {len(self)})")
        bad = indices[~self.usable[indices]]
        if len(bad):
            raise StoreError(
                f"{len(bad)} requested sample(s) are not written (done != 1), e.g. position {bad[0]} "
                f"({self.image_ids[bad[0]]}); select samples with source.usable"
            )
        return indices

    def _note_held(self, nbytes: int) -> None:
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, nbytes)

    def _read_ahead(self, slabs: Sequence[int], keys: Sequence[str]) -> Iterator[tuple[int, dict]]:
        """Yield ``(slab, data)`` in order, read and decoded in a thread up to a quarter buffer ahead.

        Blosc, crc32c and numpy copies release the GIL, so decoding overlaps the training step.
        """
        slab_bytes = max(1, self.parts[0].chunk * self.item_bytes * len(keys))
        ahead = max(2, self.buffer_bytes // 4 // slab_bytes)
        reads = ((int(s), self._read_slabs(int(s), int(s), keys)) for s in slabs)
        for slab, data in in_background(reads, ahead):
            self.bytes_read += sum(v.nbytes for v in data.values())
            yield slab, data

    def _fits(self) -> bool:
        return len(self) * self.item_bytes * len(self.shapes) <= self.buffer_bytes

    def _load_resident(self) -> dict[str, np.ndarray]:
        """Every key of every slab, decoded once (only when :meth:`_fits`)."""
        if self._resident is None:
            keys = list(self.shapes)
            dtype = self.parts[0].array.dtype
            arrays = {k: np.empty((len(self), *self.map_shape), dtype=dtype) for k in keys}
            for slab, data in self._read_ahead(range(len(self.slab_start)), keys):
                for k in keys:
                    arrays[k][self.slab_start[slab]:self.slab_stop[slab]] = data[k]
            self._resident = arrays
            self._note_held(sum(a.nbytes for a in arrays.values()))
        return self._resident

    def iter_batches(self, indices, batch_size, *, keys, shuffle, seed,
                     epoch) -> Iterator[tuple[dict, np.ndarray]]:
        """Yield ``({key: (B, C, p, p)}, (B,) int64)`` covering ``indices`` once (BatchSource)."""
        keys = list(keys)
        indices = self._check(indices, keys)
        rng = np.random.default_rng([seed, epoch, 0xB0F])
        if self._fits():
            resident, rows_of = self._load_resident(), indices
        else:
            resident, rows_of = self._subset(indices, keys), np.arange(len(indices))
        if resident is None:
            if shuffle:
                yield from self._shuffled(indices, batch_size, keys, seed, epoch)
            else:
                yield from self._ordered(indices, batch_size, keys)
            return
        order = rng.permutation(len(indices)) if shuffle else np.arange(len(indices))
        for b0 in range(0, len(order), batch_size):
            pick = order[b0:b0 + batch_size]
            yield {k: resident[k][rows_of[pick]] for k in keys}, self.labels[indices[pick]]

    def _subset(self, indices: np.ndarray, keys: list[str]) -> dict[str, np.ndarray] | None:
        """``{key: (len(indices), C, p, p)}`` kept across passes when it fits half the buffer, else None.

        A validation or test split is read the same way every epoch: decoding it
        once saves a full pass over the store per epoch.
        """
        size = len(indices) * self.item_bytes
        if size * len(keys) > self.buffer_bytes // 2:
            return None
        digest = hashlib.sha1(indices.tobytes()).hexdigest()
        missing = [k for k in keys if (k, digest) not in self._memo]
        while missing and self._memo and self._memo_bytes + size * len(missing) > self.buffer_bytes // 2:
            _, old = self._memo.popitem(last=False)
            self._memo_bytes -= old.nbytes
        if missing:
            dtype = self.parts[0].array.dtype
            fresh = {k: np.empty((len(indices), *self.map_shape), dtype=dtype) for k in missing}
            filled = 0
            for x, _ in self._ordered(indices, 4096, missing):
                for k in missing:
                    fresh[k][filled:filled + len(x[k])] = x[k]
                filled += len(x[missing[0]])
            for k in missing:
                self._memo[(k, digest)] = fresh[k]
                self._memo_bytes += fresh[k].nbytes
            self._note_held(self._memo_bytes)
        for k in keys:
            self._memo.move_to_end((k, digest))
        return {k: self._memo[(k, digest)] for k in keys}

    # ------------------------------------------------------------ streaming

    def _builder(self):
        """The window builder of streamed passes: a helper process where allowed, else a thread."""
        if self._window_builder is None:
            dtype = self.parts[0].array.dtype
            # A forked child would inherit the remote stores' async HTTP clients, bound to the
            # parent's event loop thread; object-store reads wait on the network anyway.
            if process_allowed() and not any(is_remote(p.path) for p in self.parts):
                # A window holds window_rows(k) rows of k keys, or one slab's rows if more.
                slab = max(p.chunk for p in self.parts) * self.item_bytes * len(self.shapes)
                self._window_builder = ProcessBuilder(self._read_runs, self.map_shape, dtype,
                                                     max(self.buffer_bytes // 4, slab))
            else:
                self._window_builder = ThreadBuilder(self._read_runs, self.map_shape, dtype)
        return self._window_builder

    def close(self) -> None:
        """Stop the helper process of streamed passes, if one was started (also done when the source
        is collected, and at exit)."""
        if self._window_builder is not None:
            self._window_builder.close()
            self._window_builder = None

    def __enter__(self) -> ZarrSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def window_rows(self, n_keys: int) -> int:
        """Rows of a streamed window: a quarter of the buffer (at least one)."""
        return max(1, self.buffer_bytes // 4 // (self.item_bytes * n_keys))

    def _plan(self, groups: list[list[tuple[int, np.ndarray, np.ndarray]]], n_keys: int
              ) -> list[tuple[WindowPlan, np.ndarray]]:
        """Windows from ``(slab, sample positions, window rows)`` pieces, with their labels.

        A window's pieces are merged per slab, and runs of up to :data:`RUN_SLABS`
        consecutive slabs of one store are read in one call (fewer, larger reads).
        Runs are read concurrently in groups whose slabs decode to at most a quarter
        buffer (or one run), so the slabs in flight stay within a window's size.
        """
        limit = self.buffer_bytes // 4
        row_bytes = self.item_bytes * n_keys
        plans = []
        for pieces in groups:
            by_slab: dict[int, list] = {}
            for slab, rows, dest in pieces:
                by_slab.setdefault(int(slab), []).append((rows, dest))
            y = np.empty(sum(len(rows) for _, rows, _ in pieces), dtype=np.int64)
            runs: list[list[int]] = []
            for slab in sorted(by_slab):
                if (runs and slab == runs[-1][-1] + 1 and len(runs[-1]) < RUN_SLABS
                        and self.slab_part[slab] == self.slab_part[runs[-1][0]]):
                    runs[-1].append(slab)
                else:
                    runs.append([slab])
            merged = []
            for run in runs:
                rows = np.concatenate([r for slab in run for r, _ in by_slab[slab]])
                dest = np.concatenate([d for slab in run for _, d in by_slab[slab]])
                merged.append((run[0], run[-1], rows - self.slab_start[run[0]], dest))
                y[dest] = self.labels[rows]
            reads: list[list[int]] = []
            held = 0
            for i, (first, last, _, _) in enumerate(merged):
                size = int(self.slab_stop[last] - self.slab_start[first]) * row_bytes
                if not reads or held + size > limit:
                    reads.append([])
                    held = 0
                reads[-1].append(i)
                held += size
            plans.append((WindowPlan(tuple(merged), len(y), tuple(map(tuple, reads))), y))
        return plans

    def _stream(self, plans, batch_size, keys,
                ahead: Sequence[WindowPlan] = ()) -> Iterator[tuple[dict, np.ndarray]]:
        """Serve windows in order as batches of ``batch_size`` (rows left at a window's end open the next).

        ``ahead``: the next pass's likely first windows, which the builder may start on
        as soon as this pass is served.
        """
        builder = self._builder()
        row_bytes = self.item_bytes * len(keys)
        carry_x: dict[str, list] = {k: [] for k in keys}
        carry_y: list[np.ndarray] = []
        for i, x in enumerate(builder.windows([p for p, _ in plans], keys, ahead)):
            plan, y = plans[i]
            self.bytes_read += row_bytes * sum(int(self.slab_stop[b] - self.slab_start[a])
                                               for a, b, _, _ in plan.pieces)
            self._note_held(2 * plan.n_rows * row_bytes)  # this window and the one being built
            start = 0
            if carry_y:
                start = min(batch_size - sum(map(len, carry_y)), len(y))
                for k in keys:
                    carry_x[k].append(x[k][:start].copy())
                carry_y.append(y[:start])
                if sum(map(len, carry_y)) == batch_size:
                    yield {k: np.concatenate(v) for k, v in carry_x.items()}, np.concatenate(carry_y)
                    carry_x, carry_y = {k: [] for k in keys}, []
            stop = start + (len(y) - start) // batch_size * batch_size
            for b0 in range(start, stop, batch_size):  # copies: the builder reuses its memory
                yield {k: v[b0:b0 + batch_size].copy() for k, v in x.items()}, y[b0:b0 + batch_size]
            if stop < len(y):
                for k in keys:
                    carry_x[k].append(x[k][stop:].copy())
                carry_y.append(y[stop:])
        if carry_y:
            yield {k: np.concatenate(v) for k, v in carry_x.items()}, np.concatenate(carry_y)

    def _shuffled(self, indices, batch_size, keys, seed, epoch) -> Iterator[tuple[dict, np.ndarray]]:
        indices = np.sort(indices)
        digest = (hashlib.sha1(indices.tobytes()).hexdigest(), tuple(keys), seed)
        if self._next_pass is not None and self._next_pass[0] == (*digest, epoch):
            plans = self._next_pass[1]
        else:
            plans = self._shuffle_plans(indices, keys, np.random.default_rng([seed, epoch, 0xB0F]))
        # The next epoch's plan, whose first window the helper builds while the caller
        # does something else (say, a validation pass served from memory).
        upcoming = self._shuffle_plans(indices, keys, np.random.default_rng([seed, epoch + 1, 0xB0F]))
        self._next_pass = ((*digest, epoch + 1), upcoming)
        yield from self._stream(plans, batch_size, keys, ahead=[plan for plan, _ in upcoming[:2]])

    def _shuffle_plans(self, indices, keys, rng) -> list[tuple[WindowPlan, np.ndarray]]:
        # Slabs in a seeded random order, gathered into windows of whole slabs of about a
        # quarter buffer, each window's rows scattered through its own seeded permutation.
        used, first = np.unique(self._slabs_of(indices), return_index=True)
        bounds = np.append(first, len(indices))
        rows_of = {int(s): indices[bounds[i]:bounds[i + 1]] for i, s in enumerate(used)}
        items = [(slab, rows_of[slab]) for slab in rng.permutation(used).tolist()]
        return self._windows(items, self.window_rows(len(keys)), rng.permutation, len(keys))

    def _ordered(self, indices, batch_size, keys) -> Iterator[tuple[dict, np.ndarray]]:
        # Windows of consecutive positions, cut where the slab changes once a window is
        # full: sorted positions read every slab once; unsorted ones re-read a slab for
        # each window that needs it.
        if not len(indices):
            return
        slabs = self._slabs_of(indices)
        runs = np.split(np.arange(len(indices)), np.flatnonzero(np.diff(slabs)) + 1)
        items = [(int(slabs[run[0]]), indices[run]) for run in runs]
        plans = self._windows(items, self.window_rows(len(keys)), np.arange, len(keys))
        yield from self._stream(plans, batch_size, keys)

    def _windows(self, items: list[tuple[int, np.ndarray]], limit: int,
                order_of, n_keys: int) -> list[tuple[WindowPlan, np.ndarray]]:
        """Cut ``(slab, sample positions)`` items, in order, into windows of at most ``limit`` rows
        (an item larger than that alone); a window of n rows places them at ``order_of(n)``."""
        groups: list[list[int]] = [[]]
        n_rows = 0
        for i, (_, rows) in enumerate(items):
            if n_rows and n_rows + len(rows) > limit:
                groups.append([])
                n_rows = 0
            groups[-1].append(i)
            n_rows += len(rows)
        windows = []
        for group in groups:
            dest = order_of(sum(len(items[i][1]) for i in group))
            pieces, pos = [], 0
            for i in group:
                slab, rows = items[i]
                pieces.append((slab, rows, dest[pos:pos + len(rows)]))
                pos += len(rows)
            windows.append(pieces)
        return self._plan(windows, n_keys)
