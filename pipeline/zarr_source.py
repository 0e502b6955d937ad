"""Feature slices of diffprobe stores, and a BatchSource that streams them from Zarr.

A *feature slice* is what one probe-grid read needs: one block at one pooling size,
``(sample, timestep, C, p, p)``. An extraction store offers one slice per block
(``blocks/<block>/activations``, pool = the stored map side); a pooled store (the
``pool`` stage) offers one per (block, size), at ``blocks/<block>/p<size>/activations``
(:func:`pooled_key` is the one place that spells the name).

:class:`ZarrSource` implements ``pipeline.training.BatchSource`` over one slice of
one or more stores, its timesteps served as keys ``"t<t>"``. It reads *slabs*
(one inner chunk along ``sample``: a contiguous, chunk-aligned range of samples),
decoding the next slab in a background thread while the current one is used, and
holds at most about ``buffer_bytes`` of features:

- a slice (all its timesteps) that fits in ``buffer_bytes`` is decoded once and
  served from memory afterwards (a global shuffle per epoch): no pass re-reads;
- in a larger slice, a sample subset that fits in half the buffer (typically
  the validation and test splits) is decoded once and kept, so later passes
  over it cost no reads;
- other passes stream: shuffled passes visit slabs in a seeded random order and
  shuffle the rows of a buffer of ``buffer_bytes / 4`` of slabs (the usual
  shuffle buffer of streaming loaders: chunk-level + in-buffer randomness);
  ordered passes (statistics) read each slab once and drop it after its last
  batch.

Memory: at most ``buffer_bytes`` of kept subsets and shuffle buffer (a filled
quarter-buffer and its shuffled copy) plus two slabs, whatever the size of the
store. Shuffles depend only on (indices, seed, epoch) for a given store and
``buffer_bytes``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import StoreError
from pipeline.store import ATTR_KEY, WRITTEN, block_names, open_root

#: Default shuffle buffer / slab cache of a :class:`ZarrSource`.
DEFAULT_BUFFER_BYTES = 64 << 20


def pooled_key(block: str, size: int) -> str:
    """Name of a pooled slice inside a pooled store's ``blocks/`` group: ``"<block>/p<size>"``."""
    return f"{block}/p{int(size)}"


def timestep_key(t: int) -> str:
    """BatchSource key of one timestep: ``"t<t>"``."""
    return f"t{int(t)}"


@dataclass(frozen=True)
class FeatureSlice:
    """One (block, pool) slice of a store: ``array_path`` holds (sample, timestep, C, p, p)."""

    block: str
    pool: int
    array_path: str
    shape: tuple[int, int, int]


def feature_slices(path: str | Path) -> dict[tuple[str, int], FeatureSlice]:
    """Every (block, pool) slice a store offers, in forward block order.

    A pooled store lists its attrs' ``pooled.blocks`` x ``pooled.sizes``; an
    extraction store offers each block at its stored map side (``pool`` = H).
    """
    root = open_root(path)
    attrs = root.attrs[ATTR_KEY]
    out: dict[tuple[str, int], FeatureSlice] = {}
    pooled = attrs.get("pooled")
    if pooled:
        pairs = [(b, int(s), f"blocks/{pooled_key(b, s)}/activations") for b in pooled["blocks"]
                 for s in sorted(pooled["sizes"])]
    else:
        pairs = [(b, None, f"blocks/{b}/activations") for b in block_names(root)]
    for block, size, array_path in pairs:
        c, h, w = (int(v) for v in root[array_path].shape[2:])
        out[(block, size or h)] = FeatureSlice(block, size or h, array_path, (c, h, w))
    return out


def store_timesteps(path: str | Path) -> list[int]:
    return [int(t) for t in open_root(path)["timestep"][:]]


class _Part:
    """One store's array of a slice, with its per-sample coordinates."""

    def __init__(self, path: str | Path, array_path: str, timesteps: Sequence[int]):
        root = open_root(path)
        try:
            self.array = root[array_path]
        except KeyError:
            raise StoreError(f"store {str(path)!r} has no array {array_path!r}") from None
        stored = [int(t) for t in root["timestep"][:]]
        missing = [t for t in timesteps if t not in stored]
        if missing:
            raise StoreError(f"store {str(path)!r} lacks timestep(s) {missing}; it has {stored}")
        self.t_index = {int(t): stored.index(int(t)) for t in timesteps}
        self.n = int(self.array.shape[0])
        self.chunk = int(self.array.chunks[0])
        self.labels = root["label"][:].astype(np.int64)
        self.image_ids = np.asarray(root["image_id"][:], dtype=object)
        self.done = root["done"][:]
        self.path = str(path)


class ZarrSource:
    """A :class:`~pipeline.training.BatchSource` streaming one feature slice from Zarr.

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

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def part_range(self, part: int) -> tuple[int, int]:
        """Sample positions ``[start, stop)`` served by ``parts[part]``."""
        return int(self.offsets[part]), int(self.offsets[part + 1])

    # ------------------------------------------------------------- reading

    def _read_slab(self, slab: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
        part = self.parts[self.slab_part[slab]]
        lo = int(self.slab_start[slab] - self.offsets[self.slab_part[slab]])
        hi = int(self.slab_stop[slab] - self.offsets[self.slab_part[slab]])
        out = {}
        for key in keys:
            values = part.array[lo:hi, part.t_index[int(key[1:])]]
            self.bytes_read += values.nbytes
            out[key] = values
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
        """Yield ``(slab, data)`` in order while the next slab is read and decoded in a thread.

        Blosc and crc32c release the GIL, so decoding overlaps the training step.
        """
        if not len(slabs):
            return
        with ThreadPoolExecutor(1, thread_name_prefix="zarr-source") as pool:
            future = pool.submit(self._read_slab, slabs[0], keys)
            for i, slab in enumerate(slabs):
                data = future.result()
                if i + 1 < len(slabs):
                    future = pool.submit(self._read_slab, slabs[i + 1], keys)
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
            stream = self._shuffled if shuffle else self._ordered
            yield from stream(indices, batch_size, keys, rng)
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
            for x, _ in self._ordered(indices, 4096, missing, None):
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

    def _shuffled(self, indices, batch_size, keys, rng) -> Iterator[tuple[dict, np.ndarray]]:
        indices = np.sort(indices)
        slabs = self._slabs_of(indices)
        used, first = np.unique(slabs, return_index=True)
        bounds = np.append(first, len(indices))
        rows_of = {s: indices[bounds[i]:bounds[i + 1]] for i, s in enumerate(used)}
        row_bytes = self.item_bytes * len(keys)
        held: list[tuple[dict, np.ndarray]] = []
        held_rows = 0
        carry: tuple[dict, np.ndarray] | None = None
        order = rng.permutation(used)
        for n_done, (slab, data) in enumerate(self._read_ahead(order, keys), start=1):
            rows = rows_of[slab]
            local = rows - self.slab_start[slab]
            held.append(({k: v[local] for k, v in data.items()}, self.labels[rows]))
            held_rows += len(rows)
            del data
            last = n_done == len(order)
            if held_rows * row_bytes < self.buffer_bytes // 4 and not last:
                continue
            if carry is not None:
                held.insert(0, carry)
            x = {k: np.concatenate([h[0][k] for h in held]) for k in keys}
            y = np.concatenate([h[1] for h in held])
            self._note_held(2 * len(y) * row_bytes)
            held, held_rows = [], 0
            perm = rng.permutation(len(y))
            x = {k: v[perm] for k, v in x.items()}
            y = y[perm]
            n_full = len(y) if last else len(y) - len(y) % batch_size
            for b0 in range(0, n_full, batch_size):
                yield {k: v[b0:b0 + batch_size] for k, v in x.items()}, y[b0:b0 + batch_size]
            carry = None if last else ({k: v[n_full:] for k, v in x.items()}, y[n_full:])

    def _ordered(self, indices, batch_size, keys, rng=None) -> Iterator[tuple[dict, np.ndarray]]:
        # Slabs are read ahead in order of first need and dropped after their last
        # batch: for sorted indices (train_heads' passes) that is ~2 slabs at a time.
        batch_slabs = [self._slabs_of(indices[b0:b0 + batch_size])
                       for b0 in range(0, len(indices), batch_size)]
        first_need = list(dict.fromkeys(int(s) for slabs in batch_slabs for s in slabs))
        last_batch = {int(s): b for b, slabs in enumerate(batch_slabs) for s in slabs}
        reader = self._read_ahead(first_need, keys)
        cache: dict[int, dict] = {}
        for b, slabs in enumerate(batch_slabs):
            rows = indices[b * batch_size:(b + 1) * batch_size]
            needed = np.unique(slabs)
            while any(int(s) not in cache for s in needed):
                slab, data = next(reader)
                cache[slab] = data
            self._note_held(sum(v.nbytes for d in cache.values() for v in d.values()))
            x = {}
            for k in keys:
                out = np.empty((len(rows), *self.map_shape), dtype=self.parts[0].array.dtype)
                for slab in needed:
                    mask = slabs == slab
                    out[mask] = cache[int(slab)][k][rows[mask] - self.slab_start[slab]]
                x[k] = out
            for slab in needed:
                if last_batch[int(slab)] == b:
                    del cache[int(slab)]
            yield x, self.labels[rows]
