"""What readers check before they trust a store's bytes: missing data is never read as data.

zarr reads a chunk or shard that is not on disk as the fill value (NaN for
activations and errors, 0 = pending for ``done``), and reports damaged bytes as a
bare ``Stored and computed checksum do not match``. A diffprobe store knows better:
a unit whose ``done`` says written must have its data objects. So every reader
(``ZarrSource``, pool, the CKA readers, classify scoring, ``inspect``) goes through
:class:`Integrity`:

- :meth:`Integrity.done` reads the ``done`` mask, or stops with one line when it is
  damaged (a chunk that fails to decode, or values other than 0/1/2);
- :meth:`Integrity.check_present` stops when a data object (one shard per unit and
  array) of a unit marked written is missing, naming block, timesteps and samples;
- :meth:`Integrity.array` wraps an array so that a read that fails to decode names
  the array, the chunk, its samples and timestep, and the file.

Which objects must exist (the write protocol, with zarr not storing chunks that
hold only the fill value): a data array's shard when its unit has a written sample;
the ``failure`` chunk when it has a failed sample; the ``done`` chunk when any of its
samples is done. ``diffprobe verify`` (:mod:`pipeline.store.verify`) applies the same rules.

Presence is asked of the storage, not of ``os.path``: a store on object storage (a
URL) is checked the same way, with a HEAD request per object for a few objects, or one
listing of the array's prefix (:func:`pipeline.store.location.list_files`, cached per
check) for many. The ``done`` mask is read before the listing: a unit's objects are
stored before its ``done`` cells, so a listing taken after ``done`` sees them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import DiffprobeError, StoreError
from pipeline.store.durable import array_folder
from pipeline.store.schema import ATTR_KEY, FAILED, PENDING, WRITTEN, block_names

ERROR_ARRAYS = ("error_l2", "error_l1", "error_huber", "prediction", "forward_passes")


def hint(path: str | Path) -> str:
    return (f"'diffprobe verify {path}' lists the damage; with --repair it marks the units "
            f"to recompute on the next run")


def decode_failure(exc: BaseException) -> str:
    """zarr's codec error -> what it means for the bytes on disk."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "checksum" in text.lower():
        return "fails its crc32c checksum"
    return f"cannot be decoded ({type(exc).__name__}: {text[:120]})"


def data_arrays(root) -> list[str]:
    """Paths of a unit-based store's data arrays: every block's activations, or a classify
    store's error, prediction and forward-pass arrays."""
    if "blocks" in root:
        return [f"blocks/{name}/activations" for name in block_names(root)]
    return [name for name in ERROR_ARRAYS if name in root]


def presence_kind(array_path: str) -> str:
    """Which samples of a unit require its object: ``written``, ``failed`` or ``done``."""
    return {"done": "done", "failure": "failed"}.get(array_path, "written")


def required(kind: str, flags: np.ndarray) -> bool:
    """Whether a unit with these ``done`` flags must have an object of this kind of array."""
    if kind == "done":
        return bool((flags != PENDING).any())
    return bool((flags == (FAILED if kind == "failed" else WRITTEN)).any())


def outer_objects(array, start: int = 0, stop: int | None = None,
                  folder=None) -> Iterable[tuple[tuple[int, ...], int, int, Path]]:
    """``(coords, first sample, stop sample, file)`` of every stored object (shard, or chunk
    when unsharded) of ``array`` over samples ``[start, stop)``.

    ``folder``: the array's location (a Path, or a UPath on object storage); default
    the folder of a local store's array. ``file`` is ``folder / chunk key``.
    """
    outer = array.metadata.chunk_grid.chunk_shape
    n = array.shape[0] if array.shape else 0
    stop = n if stop is None else min(stop, n)
    rest = [range(math.ceil(s / c)) for s, c in zip(array.shape[1:], outer[1:])]
    folder = array_folder(array) if folder is None else folder
    if folder is None:
        raise StoreError(f"array {array.path!r} is on object storage: give its location to list its objects")
    for i in range(start // outer[0], math.ceil(stop / outer[0])):
        for more in itertools.product(*rest):
            coords = (i, *more)
            yield coords, i * outer[0], min((i + 1) * outer[0], n), \
                folder / array.metadata.encode_chunk_key(coords)


#: Above this many objects, presence is checked against one listing of the array's
#: folder (prefix) rather than one stat / HEAD request per object.
LIST_ABOVE = 32


class Integrity:
    """The checks of one opened store (``root``: its zarr group, ``path``: its folder)."""

    def __init__(self, root, path: str | Path):
        from pipeline.store.location import as_location

        self.root = root
        self.path = as_location(path)  # a Path, or a UPath (with its storage options) for a URL
        self._done: np.ndarray | None = None
        self._timesteps: np.ndarray | None = None
        self._listed: dict[str, set[str]] = {}

    # ------------------------------------------------------------- objects

    def folder(self, array):
        """Where ``array``'s objects live: a folder, or a prefix on object storage."""
        return self.path / array.path

    def objects(self, array, start: int = 0, stop: int | None = None):
        """:func:`outer_objects` of ``array`` in this store (local or remote)."""
        return outer_objects(array, start, stop, self.folder(array))

    def present(self, array, files: Sequence) -> list[bool]:
        """Whether each of ``files`` (objects of ``array``) is stored: a stat / HEAD per
        object for a few, one listing of the array's folder (cached) for many."""
        from pipeline.store.location import exists_now

        if len(files) <= LIST_ABOVE and array.path not in self._listed:
            return [exists_now(f) for f in files]
        listed = self.listing(array)
        return [str(f) in listed for f in files]

    def listing(self, array, refresh: bool = False) -> set[str]:
        """``str()`` of every object stored under ``array``'s folder (one listing, cached)."""
        from pipeline.store.location import list_files

        if refresh or array.path not in self._listed:
            folder = self.folder(array)
            self._listed[array.path] = {str(folder / key) for key in list_files(folder)}
        return self._listed[array.path]

    # ------------------------------------------------------------- naming

    def label(self, array_path: str) -> str:
        if array_path.startswith("blocks/") and array_path.endswith("/activations"):
            return f"block {array_path[len('blocks/'):-len('/activations')]!r}"
        return f"array {array_path!r}"

    def timesteps(self) -> np.ndarray | None:
        if self._timesteps is None and "timestep" in self.root:
            self._timesteps = np.asarray(self.root["timestep"][:])
        return self._timesteps

    def where(self, array, region: Sequence[slice]) -> str:
        """``samples a..b, timestep(s) ...`` of ``region`` of ``array`` (other dims by their coordinates)."""
        dims = tuple(array.metadata.dimension_names or ()) or ("sample",)
        parts = []
        for axis, dim in enumerate(dims[:len(region)]):
            r = region[axis]
            if dim == "sample":
                parts.append(f"samples {r.start}..{r.stop - 1}")
            elif dim in ("timestep", "trial"):
                ts = self.timesteps()
                picked = [] if ts is None else ts[r].tolist()
                if len(picked) == len(ts if ts is not None else ()) and len(picked) > 1:
                    parts.append("all timesteps")
                elif picked:
                    word = "timestep" if len(picked) == 1 else "timesteps"
                    parts.append(f"{word} {', '.join(map(str, picked[:8]))}{' ...' if len(picked) > 8 else ''}")
            elif dim in self.root and r.stop - r.start < array.shape[axis]:
                try:
                    values = [str(v) for v in np.asarray(self.root[dim][r]).tolist()]
                except Exception:  # noqa: BLE001 -- a damaged coordinate: positions then
                    values = [f"{r.start}..{r.stop - 1}"]
                parts.append(f"{dim} {', '.join(values[:8])}{' ...' if len(values) > 8 else ''}")
        return ", ".join(parts) or "the whole array"

    def relative(self, file: Path) -> str:
        """``file`` relative to the store (the same text for a folder and a URL prefix)."""
        text, base = str(file), str(self.path).rstrip("/") + "/"
        return text[len(base):] if text.startswith(base) else text

    # ------------------------------------------------------------- done

    def done(self) -> np.ndarray:
        """``(n,) int8`` done flags; StoreError naming the damaged chunk or samples."""
        if self._done is None:
            self._done = self._read_done()
        return self._done

    def _read_done(self) -> np.ndarray:
        if "done" not in self.root:
            raise StoreError(f"store {self.path}: its 'done' array is missing (zarr.json lost?); {hint(self.path)}")
        array = self.root["done"]
        try:
            done = np.asarray(array[:])
        except DiffprobeError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any codec failure is damage
            coords, bad = self.first_damaged(array, [slice(0, array.shape[0])]) or ((0,), exc)
            lo = coords[0] * array.chunks[0]
            hi = min(lo + array.chunks[0], array.shape[0])
            raise StoreError(
                f"store {self.path}: the done mask is damaged: its chunk {coords[0]} (samples {lo}..{hi - 1}) "
                f"{decode_failure(bad)}; 'diffprobe verify {self.path} --repair' rebuilds it from the data present"
            ) from None
        odd = np.flatnonzero(~np.isin(done, (PENDING, WRITTEN, FAILED)))
        if len(odd):
            raise StoreError(
                f"store {self.path}: the done mask is damaged: {len(odd)} sample(s) hold flags other than "
                f"0/1/2 (first: sample {odd[0]} = {int(done[odd[0]])}); "
                f"'diffprobe verify {self.path} --repair' rebuilds it from the data present"
            )
        return done

    # ------------------------------------------------------------- presence

    def missing(self, array_path: str, start: int = 0, stop: int | None = None) -> list[tuple[int, int, Path]]:
        """``(first sample, stop, file)`` of every object of ``array_path`` over samples
        ``[start, stop)`` that ``done`` requires and the disk lacks."""
        array = self.root[array_path]
        done = self.done()  # read before the listing: a unit's objects are stored before its done cells
        kind = presence_kind(array_path)
        needed = [(lo, hi, file) for _, lo, hi, file in self.objects(array, start, stop)
                  if required(kind, done[lo:hi])]
        there = self.present(array, [file for *_, file in needed])
        return [entry for entry, ok in zip(needed, there) if not ok]

    def check_present(self, array_paths: Iterable[str] | None = None, start: int = 0,
                      stop: int | None = None) -> None:
        """StoreError naming the first missing object of a done unit among ``array_paths``
        (default: every data array), over samples ``[start, stop)``."""
        paths = data_arrays(self.root) if array_paths is None else list(array_paths)
        for array_path in paths:
            if array_path not in self.root:
                raise StoreError(f"store {self.path}: {self.label(array_path)} is missing (its zarr.json "
                                 f"is gone?); {hint(self.path)}")
            lost = self.missing(array_path, start, stop)
            if lost:
                lo, hi, file = lost[0]
                more = f" (and {len(lost) - 1} more unit(s))" if len(lost) > 1 else ""
                array = self.root[array_path]
                where = self.where(array, [slice(lo, hi)] + [slice(0, s) for s in array.shape[1:]])
                raise StoreError(
                    f"store {self.path}: {self.label(array_path)} has no data for {where}{more}, which done "
                    f"marks written: {self.relative(file)} is missing; {hint(self.path)}"
                )

    # ------------------------------------------------------------- decoding

    def first_damaged(self, array, region: Sequence[slice]) -> tuple[tuple[int, ...], BaseException] | None:
        """The first inner chunk of ``region`` that fails to decode, with its error."""
        inner = array.chunks
        ranges = [range(r.start // c, math.ceil(r.stop / c)) for r, c in zip(region, inner)]
        ranges += [range(math.ceil(s / c)) for s, c in zip(array.shape[len(region):], inner[len(region):])]
        for coords in itertools.product(*ranges):
            sel = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(coords, inner, array.shape))
            try:
                array[sel]
            except DiffprobeError:
                raise
            except Exception as exc:  # noqa: BLE001 -- any codec failure is damage
                return coords, exc
        return None

    def describe_damage(self, array, selection, exc: BaseException) -> str:
        """``block 'b' chunk (i, j, ...) (samples a..b, timestep t) in FILE fails its crc32c checksum``
        for a failed read of ``selection``."""
        region = normalise(selection, array.shape)
        found = self.first_damaged(array, region)
        coords, cause = found if found else (None, exc)
        name = self.label(array.path)
        if coords is None:
            return f"reading {name} ({self.where(array, region)}) failed: {decode_failure(cause)}"
        inner = array.chunks
        chunk_region = [slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(coords, inner, array.shape)]
        outer = array.metadata.chunk_grid.chunk_shape
        key = array.metadata.encode_chunk_key(tuple(i * c // o for i, c, o in zip(coords, inner, outer)))
        file = self.folder(array) / key
        return (f"{name} chunk {tuple(coords)} ({self.where(array, chunk_region)}) in "
                f"{self.relative(file)} {decode_failure(cause)}")

    def damage_error(self, array, selection, exc: BaseException) -> StoreError:
        """A StoreError for a failed read of ``selection``: array, chunk, samples, timestep and file."""
        return StoreError(f"store {self.path}: {self.describe_damage(array, selection, exc)}: its bytes on "
                          f"disk are damaged; {hint(self.path)}")

    def array(self, array_path: str) -> CheckedArray:
        """``array_path`` wrapped so that failed reads name the damage."""
        if array_path not in self.root:
            raise StoreError(f"store {self.path} has no array {array_path!r}")
        return CheckedArray(self.root[array_path], self)


class CheckedArray:
    """A zarr array whose reads fail with :meth:`Integrity.damage_error` instead of a codec error."""

    def __init__(self, array, integrity: Integrity):
        self.zarr = array
        self.integrity = integrity
        self.shape = array.shape
        self.dtype = array.dtype
        self.chunks = array.chunks
        self.path = array.path

    def __getitem__(self, selection):
        try:
            return self.zarr[selection]
        except DiffprobeError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any codec failure is damage
            raise self.integrity.damage_error(self.zarr, selection, exc) from None

    def read_many(self, selections: Sequence, concurrency: int) -> list[np.ndarray]:
        """``[self[s] for s in selections]``, at most ``concurrency`` of them in flight at once.

        One sync call into zarr's event loop for all of them: on object storage each
        read is a few round trips (the shard index, then its inner chunks, one after
        the other), so reads one after another wait on latency, not bandwidth. A read
        that fails is read again alone, which names the damage as ``self[s]`` does.
        """
        import asyncio

        from zarr.core.sync import sync

        if len(selections) <= 1 or concurrency <= 1:
            return [self[s] for s in selections]
        gate = asyncio.Semaphore(concurrency)
        reader = self.zarr.async_array

        async def one(selection):
            async with gate:
                return await reader.getitem(selection)

        async def every():
            return await asyncio.gather(*(one(s) for s in selections), return_exceptions=True)

        out = sync(every())
        return [self[s] if isinstance(got, BaseException) else np.asarray(got)
                for s, got in zip(selections, out)]


def normalise(selection, shape: Sequence[int]) -> list[slice]:
    """A basic selection (ints, unit-step slices) -> one slice per axis; the whole array otherwise."""
    items = selection if isinstance(selection, tuple) else (selection,)
    out = []
    try:
        for item, size in zip(items, shape):
            if isinstance(item, (int, np.integer)):
                i = int(item) % size
                out.append(slice(i, i + 1))
            elif isinstance(item, slice) and item.step in (None, 1):
                lo, hi, _ = item.indices(size)
                out.append(slice(lo, max(lo, hi)))
            else:
                raise TypeError
    except TypeError:
        return [slice(0, s) for s in shape]
    return out + [slice(0, s) for s in shape[len(out):]]


def stage_of(root) -> str | None:
    return root.attrs.get(ATTR_KEY, {}).get("stage")
