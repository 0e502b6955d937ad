"""A few samples' values from a store, reading about what they return.

Slice readers (probes, CKA, pool) read whole inner chunks: an inner chunk is
``(n, 1, C, H, W)`` with n up to ~1,000 samples, so reading 100 random samples over
every block and timestep through zarr decodes 100 chunks per (block, timestep) and
reads ~100x the bytes it returns (benchmarks/naive_cache.py). :func:`read_samples` instead reads the bytes of the
requested samples only, from the same files, without any change to the store format
(TensorStore, xarray and zarr read the stores as before).

How: by default a store keeps its values raw inside Zarr v3 sharding (the
``sharding_indexed`` codec with inner codecs ``bytes`` + ``crc32c``, whole maps per
inner chunk, samples leading). An inner chunk is then the C-order bytes of its
``(n, t, C, H, W)`` values followed by 4 checksum bytes, so sample ``j``, timestep
``k`` of it lies at ``offset + (j * t + k) * C * H * W * itemsize``. The shard's index
(``(offset, nbytes)`` uint64 pairs for each inner chunk, with its own crc32c, at the
shard's end or start as ``index_location`` says) gives ``offset``. A
:class:`SampleReader` reads each shard's index once (and keeps it), then reads each
requested (sample, timestep) slab with one byte-range read, adjacent slabs of one
shard merged into one read: ``os.pread`` on local files, and on object storage one ranged
GET per merged range (16 in flight) through the store's zarr client, obstore or s3fs as
:mod:`pipeline.store.location` picks for every reader.

What a byte-range read cannot do is check an inner chunk's crc32c (that needs the
whole chunk). The shard index's own crc32c is checked; the values are not.
``check=True`` reads whole inner chunks through zarr instead, every checksum verified
(the damage named as every reader names it), and ``diffprobe verify STORE`` checks
every chunk of a store. Stores whose chain is anything else (compressed with Blosc,
filtered with BitRound, unsharded, a partial map per chunk) are read the same way as
``check=True``: correct, but amplified as a slice reader's reads are.

Failed images (``done == 2``) read as NaN, as in xarray; samples not written yet
(``done == 0``) and a missing shard of a written unit are a StoreError naming the
block, samples and timesteps.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import StoreError
from pipeline.store import location
from pipeline.store.checks import LIST_ABOVE, Integrity, hint
from pipeline.store.layout import SAMPLE_COORDS, open_root
from pipeline.store.schema import PENDING
from pipeline.store.slices import stored_groups, timestep_positions

#: An index entry of an inner chunk that was never stored (it held only the fill value).
EMPTY = 2**64 - 1
#: Byte-range requests in flight at once on object storage.
CONCURRENCY = 16


@dataclass(frozen=True)
class RawShards:
    """Where values lie in an array's shards, when they are stored raw.

    ``shard`` and ``inner`` are the shard and inner chunk shapes; ``dtype`` carries the
    stored byte order; ``checksum``: inner chunks end with a crc32c; ``index_nbytes``
    is the shard index's size (its crc32c included when ``index_checksum``).
    """

    shard: tuple[int, ...]
    inner: tuple[int, ...]
    dtype: np.dtype
    checksum: bool
    index_at_end: bool
    index_checksum: bool

    @property
    def per_shard(self) -> tuple[int, ...]:
        return tuple(s // c for s, c in zip(self.shard, self.inner))

    @property
    def index_nbytes(self) -> int:
        return 16 * math.prod(self.per_shard) + 4 * self.index_checksum

    def chunk_nbytes(self) -> int:
        return math.prod(self.inner) * self.dtype.itemsize + 4 * self.checksum


def raw_shards(array) -> RawShards | None:
    """The byte layout of ``array``'s shards if a sample's values are byte ranges of them, else None.

    That holds for Zarr v3 ``sharding_indexed`` whose inner codecs are ``bytes`` alone or
    ``bytes`` + ``crc32c``, whose index codecs are ``bytes`` (+ ``crc32c``), and whose inner
    chunks hold whole ``(C, H, W)`` maps (one sample's maps are then contiguous).
    """
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    codecs = getattr(array.metadata, "codecs", ())
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]

    def plain(chain) -> tuple[object, bool] | None:
        chain = tuple(chain)
        if not chain or not isinstance(chain[0], BytesCodec):
            return None
        if chain[1:] == ():
            return chain[0], False
        if len(chain) == 2 and isinstance(chain[1], Crc32cCodec):
            return chain[0], True
        return None

    inner, index = plain(sharding.codecs), plain(sharding.index_codecs)
    if inner is None or index is None or str(getattr(index[0].endian, "value", "little")) != "little":
        return None
    chunk = tuple(int(c) for c in sharding.chunk_shape)
    if chunk[2:] != tuple(array.shape[2:]):
        return None
    order = "<" if str(getattr(inner[0].endian, "value", "little")) == "little" else ">"
    return RawShards(tuple(int(s) for s in array.metadata.chunk_grid.chunk_shape), chunk,
                     np.dtype(array.dtype).newbyteorder(order), inner[1],
                     str(sharding.index_location.value) == "end", index[1])


class SampleReader:
    """Reads a few samples of a store's blocks; shard indexes are read once and kept.

    Parameters
    ----------
    store : str, Path or location
        A store folder or URL (an extraction or pool output, local or on object storage).

    Attributes
    ----------
    bytes_read : int
        Bytes fetched by byte range so far (shard indexes and slabs); whole-chunk reads
        through zarr (``check=True``, compressed stores) are not counted.
    """

    def __init__(self, store):
        self.path = location.as_location(store)
        self.root = open_root(self.path)
        self.checks = Integrity(self.root, self.path)
        self.zstore = self.root.store
        self.local = getattr(self.zstore, "root", None)
        self.local = Path(self.local) if isinstance(self.local, (str, Path)) else None
        self._indexes: dict[str, np.ndarray | None] = {}
        self._coords: dict[str, dict[str, np.ndarray]] = {}
        self.bytes_read = 0

    # ------------------------------------------------------------- the API

    def read(self, block: str, samples, timesteps: Sequence[int] | None = None, *, check: bool = False):
        """Every requested sample's maps at the requested timesteps, as an ``xarray.DataArray``.

        Parameters
        ----------
        block : str
            The block, as named under ``blocks/`` (a pooled store's ``"<block>/p<size>"``).
        samples : sequence of int or of str
            Sample positions (0-based rows of the store), or image ids: an id selects every
            view of that image, in store order. In the order given; repeats are repeated.
        timesteps : sequence of int, optional
            Timestep values (default: all the store's), in the order given.
        check : bool
            Read whole inner chunks through zarr, so every crc32c is verified (slower:
            the bytes of whole chunks are read).

        Returns
        -------
        xarray.DataArray
            ``(sample, timestep, channel, y, x)`` in the stored dtype, with the coordinates
            ``xr.open_zarr(store, group=f"blocks/{block}")["activations"]`` has (``sample``,
            ``timestep``, ``image_id``, ``view``, ``flipped``, ``label``): equal to its
            ``.isel(sample=positions, timestep=...)``.
        """
        import xarray as xr

        array_path = f"blocks/{block}/activations"
        if array_path not in self.root:
            raise StoreError(f"store {self.path} has no block {block!r}; it has {self.block_names()}")
        array = self.root[array_path]
        group = self.root[f"blocks/{block}"]
        positions = self._positions(block, group, samples, int(array.shape[0]))
        stored_t = [int(t) for t in group["timestep"][:]]
        t_index = self._timestep_index(stored_t, timesteps)
        unique, inverse = np.unique(positions, return_inverse=True)
        self._refuse_pending(block, unique, [stored_t[i] for i in t_index])
        layout = None if check else raw_shards(array)
        if layout is None:
            values = self._read_through_zarr(array_path, unique, t_index)
        else:
            values = self._read_ranges(array_path, array, layout, unique, t_index)
        picked_t = np.asarray([stored_t[i] for i in t_index], dtype=group["timestep"].dtype)
        coords = {"sample": ("sample", positions.astype(np.int64)), "timestep": ("timestep", picked_t)}
        for name, column in self._sample_coords(block, group).items():
            coords[name] = ("sample", column[positions])
        attrs = {k: v for k, v in array.attrs.items() if k != "coordinates"}
        dims = tuple(array.metadata.dimension_names or ("sample", "timestep", "channel", "y", "x"))
        return xr.DataArray(values[inverse], dims=dims, coords=coords, attrs=attrs, name="activations")

    # ------------------------------------------------------------- what is asked

    def block_names(self) -> list[str]:
        """The store's blocks as :meth:`read` names them (a pooled store's ``"<block>/p<size>"``)."""
        return [key for _, _, key in stored_groups(self.root)]

    def n_samples(self) -> int:
        """Rows of the store (every block has them all)."""
        return int(self.root[f"blocks/{self.block_names()[0]}/activations"].shape[0])

    def _positions(self, block: str, group, samples, n: int) -> np.ndarray:
        """``(k,) int64`` store rows of ``samples`` (positions or image ids), in the order asked."""
        asked = np.asarray([samples] if isinstance(samples, (int, np.integer, str)) else list(samples))
        if asked.size == 0:
            return np.zeros(0, dtype=np.int64)
        if asked.dtype.kind in "iu":
            bad = asked[(asked < 0) | (asked >= n)]
            if len(bad):
                raise StoreError(f"store {self.path}: sample position {int(bad[0])} is outside 0..{n - 1}")
            return asked.astype(np.int64)
        if asked.dtype.kind not in "UO" or not all(isinstance(s, str) for s in asked.tolist()):
            raise StoreError(f"samples must be positions (ints) or image ids (str); got {asked.dtype} values")
        ids = self._sample_coords(block, group)["image_id"]
        ids = ids if ids.dtype.kind == "U" else ids.astype(str)  # stores of before: StringDType
        wanted = np.unique(asked.astype(str))
        hits = np.flatnonzero(np.isin(ids, wanted))
        rows: dict[str, list[int]] = {}
        for row in hits.tolist():
            rows.setdefault(str(ids[row]), []).append(row)
        unknown = [s for s in wanted.tolist() if s not in rows]
        if unknown:
            shown = ", ".join(repr(s) for s in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise StoreError(f"store {self.path} has no image id {shown} ({len(unknown)} unknown of "
                             f"{len(wanted)} asked); its ids are the dataset's paths, e.g. {str(ids[0])!r}")
        return np.asarray([r for s in asked.tolist() for r in rows[s]], dtype=np.int64)

    def _sample_coords(self, block: str, group) -> dict[str, np.ndarray]:
        """The group's per-sample coordinates, read once per reader (each is one chunk: a
        selection would decode all of it anyway)."""
        if block not in self._coords:
            self._coords[block] = {name: np.asarray(group[name][:]) for name in SAMPLE_COORDS
                                   if name in group}
        return self._coords[block]

    def _timestep_index(self, stored: list[int], timesteps: Sequence[int] | None) -> list[int]:
        if timesteps is None:
            return list(range(len(stored)))
        return timestep_positions(self.path, stored, np.atleast_1d(np.asarray(timesteps)).tolist())

    def _refuse_pending(self, block: str, unique: np.ndarray, timesteps: list[int]) -> None:
        done = self.checks.done()
        pending = unique[done[unique] == PENDING]
        if len(pending):
            shown = ", ".join(map(str, pending[:8].tolist())) + (" ..." if len(pending) > 8 else "")
            raise StoreError(
                f"store {self.path}: block {block!r} has no data yet for {len(pending)} requested sample(s) "
                f"({shown}; timesteps {timesteps}): their units are not written (done = 0); run the stage "
                f"again to finish the store ('diffprobe inspect {self.path}' lists the missing units)")

    # ------------------------------------------------------------- whole chunks (verified)

    def _read_through_zarr(self, array_path: str, unique: np.ndarray, t_index: list[int]) -> np.ndarray:
        """``(len(unique), len(t_index), C, H, W)`` read as whole inner chunks by zarr (crc32c checked)."""
        checked = self.checks.array(array_path)
        array = checked.zarr
        shard_n = int(array.metadata.chunk_grid.chunk_shape[0])
        shards = np.unique(unique // shard_n)
        if len(shards) > LIST_ABOVE:
            self.checks.listing(array)  # one listing instead of a stat per shard
        for s in shards.tolist():
            self.checks.check_present([array_path], s * shard_n, (s + 1) * shard_n)
        chunk_n = int(array.chunks[0])
        out = np.empty((len(unique), len(t_index), *array.shape[2:]), dtype=array.dtype)
        groups = np.split(np.arange(len(unique)), np.flatnonzero(np.diff(unique // chunk_n)) + 1)
        selections, targets = [], []
        for rows in groups:
            lo, hi = int(unique[rows[0]]), int(unique[rows[-1]]) + 1
            for k, t in enumerate(t_index):
                selections.append((slice(lo, hi), slice(t, t + 1)))
                targets.append((rows, k, unique[rows] - lo))
        for got, (rows, k, within) in zip(checked.read_many(selections, CONCURRENCY), targets):
            out[rows, k] = got[within, 0]
        return out

    # ------------------------------------------------------------- byte ranges

    def _read_ranges(self, array_path: str, array, lay: RawShards, unique: np.ndarray,
                     t_index: list[int]) -> np.ndarray:
        """``(len(unique), len(t_index), C, H, W)``: one byte range per (sample, timestep) slab,
        adjacent slabs of a shard read as one."""
        map_shape = tuple(int(s) for s in array.shape[2:])
        slab = math.prod(map_shape) * lay.dtype.itemsize
        pos = np.repeat(unique, len(t_index))
        ts = np.tile(np.asarray(t_index, dtype=np.int64), len(unique))
        if not len(pos):
            return np.zeros((len(unique), len(t_index), *map_shape), dtype=array.dtype)
        local_s, local_t = pos % lay.shard[0], ts % lay.shard[1]
        # each element's shard, as a row of `shards` (sample-shard, timestep-shard)
        shards, shard_of = np.unique(np.stack([pos // lay.shard[0], ts // lay.shard[1]], axis=1), axis=0,
                                     return_inverse=True)
        shard_of = shard_of.reshape(-1)
        rest = (0,) * (len(lay.shard) - 2)
        keys = [f"{array_path}/{array.metadata.encode_chunk_key((int(a), int(b), *rest))}" for a, b in shards]
        indexes = self._shard_indexes(array_path, lay, keys, shards[:, 0])
        table = np.stack([np.full((*lay.per_shard, 2), EMPTY, dtype=np.uint64) if i is None else i
                          for i in indexes])  # a missing shard (failed images only) reads as never stored
        entry = table[(shard_of, local_s // lay.inner[0], local_t // lay.inner[1]) + rest]
        stored = np.flatnonzero(entry[:, 0] != EMPTY)  # an inner chunk never stored held only the fill value
        bad = stored[entry[stored, 1] != lay.chunk_nbytes()]
        if len(bad):
            damaged = self.checks.relative(self._file(keys[shard_of[bad[0]]]))
            raise StoreError(f"store {self.path}: the index of {damaged} gives an inner chunk of "
                             f"{int(entry[bad[0], 1])} bytes where {lay.chunk_nbytes()} are expected: the shard is damaged; {hint(self.path)}")
        start = entry[stored, 0].astype(np.int64) + (
            (local_s[stored] % lay.inner[0]) * lay.inner[1] + local_t[stored] % lay.inner[1]) * slab
        order = np.lexsort((start, shard_of[stored]))
        start, owner, elements = start[order], shard_of[stored][order], stored[order]
        # a run breaks where the shard changes or the next slab does not follow on
        breaks = np.flatnonzero((np.diff(owner) != 0) | (np.diff(start) != slab)) + 1
        firsts = np.concatenate([[0], breaks]).astype(np.int64)
        lasts = np.concatenate([breaks, [len(start)]]).astype(np.int64)
        runs = [(keys[owner[f]], int(start[f]), int(start[f]) + int(l - f) * slab)
                for f, l in zip(firsts.tolist(), lasts.tolist())] if len(start) else []
        out = np.full((len(pos), *map_shape), array.fill_value, dtype=array.dtype)
        if runs:
            data = b"".join(self._fetch(runs))
            out[elements] = np.frombuffer(data, dtype=lay.dtype).reshape(len(elements), *map_shape)
        return out.reshape(len(unique), len(t_index), *map_shape)

    def _file(self, key: str):
        return self.path / key

    def _shard_indexes(self, array_path: str, lay: RawShards, keys: list[str],
                       sample_shards: np.ndarray) -> list[np.ndarray | None]:
        """Each shard's ``(*per_shard, 2)`` uint64 index (None: not stored), read once per reader.

        A shard that is not stored is refused when ``done`` marks a sample of it written
        (the same one line every reader gives); else (failed images only) it reads as NaN.
        """
        import google_crc32c

        fresh = [k for k in dict.fromkeys(keys) if k not in self._indexes]
        size = lay.index_nbytes
        request = (-size, None) if lay.index_at_end else (0, size)
        for key, raw in zip(fresh, self._fetch([(k, *request) for k in fresh], missing_ok=True)):
            if raw is None:
                self._indexes[key] = None
                continue
            body = raw[:-4] if lay.index_checksum else raw
            if len(raw) != size or (lay.index_checksum
                                    and google_crc32c.value(body) != int.from_bytes(raw[-4:], "little")):
                damaged = self.checks.relative(self._file(key))
                raise StoreError(f"store {self.path}: the shard index of {damaged} fails its crc32c checksum: its bytes are damaged; {hint(self.path)}")
            self._indexes[key] = np.frombuffer(body, dtype="<u8").reshape(*lay.per_shard, 2)
        for key, s in zip(keys, sample_shards.tolist()):
            if self._indexes[key] is None:
                self.checks.check_present([array_path], s * lay.shard[0], (s + 1) * lay.shard[0])
        return [self._indexes[k] for k in keys]

    def _fetch(self, requests: Sequence[tuple[str, int, int | None]], missing_ok: bool = False) -> list:
        """The bytes of each ``(key, start, stop)`` (``start < 0, stop None``: the last ``-start``
        bytes); None for a key that is not stored when ``missing_ok``."""
        if not requests:
            return []
        out = self._fetch_local(requests) if self.local is not None else self._fetch_remote(requests)
        if not missing_ok and any(b is None for b in out):
            key = requests[[b is None for b in out].index(True)][0]
            raise StoreError(f"store {self.path}: {key} vanished while it was read; {hint(self.path)}")
        self.bytes_read += sum(len(b) for b in out if b is not None)
        return out

    def _fetch_local(self, requests) -> list:
        out: list = []
        fds: dict[str, int | None] = {}
        try:
            for key, start, stop in requests:
                if key not in fds:
                    try:
                        fds[key] = os.open(self.local / key, os.O_RDONLY)
                    except FileNotFoundError:
                        fds[key] = None
                fd = fds[key]
                if fd is None:
                    out.append(None)
                    continue
                if start < 0:
                    size = os.fstat(fd).st_size
                    start, stop = max(0, size + start), size
                out.append(os.pread(fd, stop - start, start))
        finally:
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)
        return out

    def _fetch_remote(self, requests) -> list:
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        # One GET per range, CONCURRENCY in flight: not get_partial_values, whose obstore path
        # merges ranges up to 1 MiB apart (it would read most of a shard for scattered samples)
        # and raises for a missing object where get answers None.
        proto = default_buffer_prototype()
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(key, start, stop):
            async with gate:
                return await self.zstore.get(key, proto, byte_range=SuffixByteRequest(-start) if start < 0
                                             else RangeByteRequest(start, stop))

        async def every():
            return await asyncio.gather(*(one(*request) for request in requests))

        return [None if b is None else b.to_bytes() for b in sync(every())]


def read_samples(store, block: str, samples, timesteps: Sequence[int] | None = None, *, check: bool = False):
    """A few samples' ``(sample, timestep, channel, y, x)`` maps of one block, reading ~what they return.

    ``SampleReader(store).read(block, samples, timesteps, check=check)``: see
    :meth:`SampleReader.read` for the arguments and the module docstring for how the
    bytes are found. Keep a :class:`SampleReader` to read several blocks or batches of
    one store (its shard indexes and ids are read once).
    """
    return SampleReader(store).read(block, samples, timesteps, check=check)


def export_samples(reader: SampleReader, samples, out, blocks: Sequence[str] | None = None,
                   timesteps: Sequence[int] | None = None, *, check: bool = False) -> list[str]:
    """Write a few samples' maps of every (or the named) block of ``reader``'s store to one ``.npz`` file.

    The file holds one array per block, keyed by the block's name (a pooled store's
    ``"<block>/p<size>"``), ``(sample, timestep, channel, y, x)`` in the stored dtype, and
    the shared coordinates as ``sample``, ``timestep``, ``image_id``, ``label``, ``view``
    and ``flipped`` (what the store has): ``np.load(out)["mid_block"]`` needs neither
    diffprobe nor zarr. ``out`` may be a URL. Returns one line per block for the user.
    """
    import io

    names = list(blocks) if blocks else reader.block_names()
    arrays: dict[str, np.ndarray] = {}
    coords: dict[str, np.ndarray] = {}
    lines = []
    for name in names:
        before = reader.bytes_read
        got = reader.read(name, samples, timesteps, check=check)
        arrays[name] = got.values
        for coord in ("sample", "timestep", *SAMPLE_COORDS):
            if coord in got.coords:
                value = np.asarray(got[coord].values)
                if coord in coords and not np.array_equal(coords[coord], value):
                    raise StoreError(f"store {reader.path}: block {name!r} has other {coord} values than "
                                     f"{names[0]!r}; export the blocks one at a time (--block)")
                coords[coord] = value
        read = reader.bytes_read - before
        how = f"read {read / 2**10:.1f} KiB by byte range" if read else "read whole chunks through zarr"
        lines.append(f"{name}: {got.shape[0]} sample(s) x {got.shape[1]} timestep(s) x "
                     f"{tuple(got.shape[2:])} {got.dtype}; {how}")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, **{k: (v.astype(str) if v.dtype.kind in "OT" else v) for k, v in coords.items()})
    target = location.as_location(out)
    target.write_bytes(buffer.getvalue())
    lines.append(f"wrote {target} ({len(buffer.getvalue()) / 2**20:.2f} MiB)")
    return lines
