"""The store schema and the one write protocol (Zarr v3).

Layout of an activation store (one per model x dataset x split)::

    /                      attrs: diffprobe={...provenance, stage hash...}, coordinates
    sample      (sample)   int64 position 0..n-1
    image_id    (sample)   str   the dataset's own id
    view        (sample)   int   augmented view index (0..k-1)
    flipped     (sample)   bool  horizontally flipped view
    crop_side, crop_x0, crop_y0 (sample) int32, only with extract's ``augment``: the
                           random crop each view drew (short side rescaled to
                           crop_side, window's corner); -1 for view 0 / failed
                           images. Written with each unit, like ``done``.
    label       (sample)   int   class index
    class_name  (class)    str   class names;  class (class) int
    timestep    (timestep) int
    done        (sample)   int8  0 pending, 1 written, 2 failed (unreadable image)
    failure     (sample)   str   why a sample failed ('' otherwise)
    blocks/<module path>/activations (sample, timestep, channel, y, x)
                           + copies of the 1-D sample/timestep coordinates, so a
                           single group opened with xr.open_zarr carries them too.

Chunks are (n, 1, C, H, W): one timestep, whole maps, n samples so a chunk is a
few MiB. Shards are (unit, T, C, H, W): a *unit* is a shard-aligned range of
samples (all timesteps), the unit of work, resume and ``--shard i/N``; one shard
file per (unit, block), so an ImageNet-size store stays well under 1e5 files.
Reading one (block, timestep) slice still reads only that slice's inner chunks
(the shard index gives their byte ranges).

The write protocol (why: zarr-python has never supported two writers in one
shard; concurrent partial shard writes silently lose data, zarr-python #3682,
#2729, dask #12583):

1. ``create_store`` writes the whole schema once, atomically (built in a temp
   folder, then renamed into place; a losing racer opens the winner's store).
2. Workers write whole units only (``write_unit``): every shard of a unit is
   written by one writer, in full.
3. After a unit's data is durable its ``done`` cells are set; ``done`` is chunked
   per unit, so no two writers touch the same chunk.
4. ``finalize`` (one process, behind a lock file) consolidates metadata and
   stamps ``complete`` once every unit is done.

On object storage (an ``s3://``/``gs://``/``az://`` location) there is no rename and no
lock file; steps 1 and 4 use conditional writes instead (put-if-absent), as
``pipeline/store/location.py`` describes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import threading
import shutil
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

import pipeline
from pipeline.errors import ConfigError, StoreError
from pipeline.store import location
from pipeline.store.schema import ATTR_KEY, FAILED, PENDING, WRITTEN, block_names

DIMS = ("sample", "timestep", "channel", "y", "x")
SAMPLE_COORDS = ("image_id", "view", "flipped", "label")
#: per-sample crop of an augmented view, known only once its image is decoded
CROP_COORDS = ("crop_side", "crop_x0", "crop_y0")
#: numpy's variable-width string dtype (numpy >= 2): ids held in memory without a Python
#: object per string (stores keep fixed-width ``<U`` arrays: ``write_1d``)
STRINGS = np.dtypes.StringDType()
STORAGE_DTYPES = {"float16": "float16", "float32": "float32", "bfloat16": "float32"}


@dataclass(frozen=True)
class Compression:
    """Codec settings for activations.

    The default stores the values as they are, with a crc32c checksum per chunk: on
    the trained digits model's float16 activations Blosc zstd + bitshuffle saves 4 %
    (ratio 1.04) for ~13x the CPU of a plain copy, lz4 + bitshuffle 2 % for ~3x, and
    lz4 + byte shuffle nothing (benchmarks/RESULTS.md, "Codecs"): on a GPU node that CPU
    is better left to the writer and decoding. ``cname: zstd`` (``clevel``, ``shuffle``)
    turns compression on, e.g. with ``bitround_keepbits: 7`` (1.30x, lossy), which adds
    the numcodecs BitRound filter (opt-in, not a v3 spec codec: other implementations
    may not read it and zarr-python warns when reading). Everything else is a Zarr v3
    spec codec (Blosc, crc32c), so TensorStore and zarrs read the stores too.
    """

    cname: Literal["zstd", "lz4", "lz4hc", "blosclz", "zlib", "none"] = "none"
    clevel: int = 3
    shuffle: str = "bitshuffle"
    bitround_keepbits: int | None = None
    checksum: bool = True


class UnitRanges:
    """Units of ``unit_samples`` consecutive samples (the last may be short)."""

    n_samples: int
    unit_samples: int

    @property
    def n_units(self) -> int:
        return math.ceil(self.n_samples / self.unit_samples)

    def unit_range(self, unit: int) -> tuple[int, int]:
        start = unit * self.unit_samples
        return start, min(start + self.unit_samples, self.n_samples)


@dataclass(frozen=True)
class Layout(UnitRanges):
    """Shapes, chunking and units of a store; everything the writers need to agree on."""

    n_samples: int
    unit_samples: int
    timesteps: tuple[int, ...]
    blocks: dict[str, tuple[int, int, int]]
    dtype: str = "float16"
    chunk_samples: dict[str, int] = field(default_factory=dict)

    def bytes_per_sample(self) -> int:
        item = np.dtype(STORAGE_DTYPES[self.dtype]).itemsize
        return sum(int(np.prod(s)) for s in self.blocks.values()) * len(self.timesteps) * item


def pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


def bounded_padding(chunk: int, n_samples: int) -> int:
    """Halve a power-of-two chunk (down to 8 samples) until the last chunk's padding is <= 1/16 of the store.

    Zarr's regular chunk grid pads the last chunk with the fill value (NaN) to its full
    size, and without a compressor the padding is stored as it is: a 360-sample store
    in 512-sample chunks took 1.42x its data. Large stores and stores that fill their
    last chunk keep their chunk size.
    """
    while chunk > 8 and (-n_samples) % chunk > n_samples / 16:
        chunk //= 2
    return chunk


def make_layout(
    n_samples: int,
    blocks: Mapping[str, tuple[int, int, int]],
    timesteps: Sequence[int],
    dtype: str = "float16",
    unit_samples: int | None = None,
    chunk_bytes: int = 2 << 20,
    unit_bytes: int = 1 << 30,
    max_unit_samples: int = 1024,
) -> Layout:
    """Choose chunk and unit sizes.

    Per block, chunk n = the power of two giving ~``chunk_bytes`` per (n, 1, C, H, W)
    chunk. The unit is a power of two, at least every block's chunk n, and at most
    what keeps one unit's buffer (all blocks, all timesteps) under ``unit_bytes``
    (capped at ``max_unit_samples`` so resume and ``--shard`` stay fine-grained).
    An explicit ``unit_samples`` must be a multiple of every chunk n it implies
    (chunks are shrunk to divide it). See ``bounded_padding`` for the last chunk.
    """
    if dtype not in STORAGE_DTYPES:
        raise StoreError(f"unknown dtype {dtype!r}; use float16, bfloat16 or float32")
    item = np.dtype(STORAGE_DTYPES[dtype]).itemsize
    per_block = {name: int(np.prod(shape)) * item for name, shape in blocks.items()}
    chunk_n = {name: bounded_padding(pow2_floor(chunk_bytes / b), n_samples) for name, b in per_block.items()}
    if unit_samples is None:
        per_sample_all = sum(per_block.values()) * len(timesteps)
        unit = min(pow2_floor(unit_bytes / max(1, per_sample_all)), max_unit_samples)
        unit = min(unit, 1 << math.ceil(math.log2(max(1, n_samples))))
        chunk_n = {k: min(v, unit) for k, v in chunk_n.items()}
    else:
        if unit_samples < 1:
            raise ConfigError(f"unit_samples must be >= 1, got {unit_samples}")
        unit = unit_samples
        chunk_n = {k: math.gcd(min(v, unit), unit) for k, v in chunk_n.items()}
    return Layout(n_samples, unit, tuple(int(t) for t in timesteps), dict(blocks), dtype, chunk_n)


def codecs_for(comp: Compression):
    from zarr.codecs import BloscCodec, Crc32cCodec

    # cname "none": no compressor (activations barely compress; reading them raw is several
    # times cheaper than zstd for probes that stream the store every epoch).
    compressors = [] if comp.cname == "none" else [BloscCodec(cname=comp.cname, clevel=comp.clevel,
                                                              shuffle=comp.shuffle)]
    if comp.checksum:
        compressors.append(Crc32cCodec())
    filters = None
    if comp.bitround_keepbits is not None:
        from zarr.codecs.numcodecs import BitRound

        filters = [BitRound(keepbits=comp.bitround_keepbits)]
    return compressors, filters


# Coordinates are stored as fixed-width strings on purpose (see write_1d); zarr-python
# would note it at every metadata save (creation, consolidation, finalize, repair).
warnings.filterwarnings("ignore", message=r"The data type \(FixedLengthUTF32")


@contextlib.contextmanager
def quiet_zarr():
    """Suppress zarr's notes on consolidated metadata / numcodecs codecs we chose knowingly."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        yield


def write_1d(group, name: str, values, dim: str, dtype=None, chunks=None):
    """A 1-D coordinate array along ``dim``; ``dtype=str`` stores fixed-width strings.

    Strings (image ids, class names, prompts) are stored as numpy ``<U{longest}``, which
    zarr-python writes as its ``fixed_length_utf32`` data type, so zarr and xarray read
    them back as plain ``str`` (a variable-length v3 ``string`` reads as numpy's
    StringDType, which pandas warns about in ``where(drop=True)`` and ``groupby``). That
    type is a zarr-python extension without a v3 specification yet, which zarr notes
    whenever metadata is saved (silenced below, for that type only); the stores' data
    arrays keep spec types only.
    """
    if dtype is str:
        if not isinstance(values, np.ndarray) or values.dtype.kind not in "TU":
            values = np.asarray([str(v) for v in values], dtype=STRINGS)
        values = values.astype(f"<U{max(1, int(np.strings.str_len(values).max(initial=1)))}")
    else:
        values = np.asarray(values)
    arr = group.create_array(
        name,
        shape=values.shape,
        dtype=values.dtype if dtype in (None, str) else dtype,
        chunks=chunks or (max(1, len(values)),),
        dimension_names=(dim,),
        fill_value="" if dtype is str else 0,
    )
    if len(values):
        arr[:] = values
    return arr


@dataclass(frozen=True)
class SampleTable:
    """Per-sample coordinates, in store order, as arrays (sequences given are converted):
    ``image_id`` StringDType, ``view`` int32, ``flipped`` bool, ``label`` int64, so a
    table of a million samples holds no Python object per sample."""

    image_id: np.ndarray
    view: np.ndarray
    flipped: np.ndarray
    label: np.ndarray
    #: (n, 3) int (crop_side, crop_x0, crop_y0), -1 where none was drawn; None: no crop coords
    crops: np.ndarray | None = None

    def __post_init__(self):
        for name, dtype in (("image_id", STRINGS), ("view", np.int32), ("flipped", bool), ("label", np.int64)):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))


def read_sample_table(root) -> SampleTable:
    """The per-sample coordinates of an open store (to give a derived store the same ones)."""
    crops = None
    if all(name in root for name in CROP_COORDS):
        crops = np.stack([root[name][:] for name in CROP_COORDS], axis=1)
    return SampleTable(np.asarray(root["image_id"][:]).astype(STRINGS), root["view"][:],
                       root["flipped"][:], root["label"][:], crops)


def create_store(
    path: str | Path,
    layout: Layout,
    samples: SampleTable,
    class_names: Sequence[str],
    attrs: dict,
    compression: Compression = Compression(),
) -> None:
    """Write the whole schema (arrays, coords, attrs) atomically; data arrays stay empty (NaN)."""
    storage_dtype = STORAGE_DTYPES[layout.dtype]
    with new_group(path) as root:
        compressors, filters = codecs_for(compression)
        n = layout.n_samples
        write_1d(root, "sample", np.arange(n, dtype=np.int64), "sample")
        write_1d(root, "image_id", samples.image_id, "sample", dtype=str)
        write_1d(root, "view", np.asarray(samples.view, dtype=np.int32), "sample")
        write_1d(root, "flipped", np.asarray(samples.flipped, dtype=bool), "sample")
        write_1d(root, "label", np.asarray(samples.label, dtype=np.int64), "sample")
        write_1d(root, "class", np.arange(len(class_names), dtype=np.int64), "class")
        write_1d(root, "class_name", list(class_names), "class", dtype=str)
        write_1d(root, "timestep", np.asarray(layout.timesteps, dtype=np.int64), "timestep")
        create_status_arrays(root, n, layout.unit_samples)
        if samples.crops is not None:
            for name, values in zip(CROP_COORDS, np.asarray(samples.crops, dtype=np.int32).T):
                # one chunk per unit: each unit's writer records the crops it drew
                root.create_array(name, shape=(n,), dtype="int32", fill_value=-1, chunks=(layout.unit_samples,),
                                  dimension_names=("sample",))[:] = values
        blocks = root.create_group("blocks")
        for name, (c, h, w) in layout.blocks.items():
            g = blocks.create_group(name)
            cn = layout.chunk_samples.get(name, layout.unit_samples)
            g.create_array(
                "activations",
                shape=(n, len(layout.timesteps), c, h, w),
                dtype=storage_dtype,
                chunks=(cn, 1, c, h, w),
                shards=(layout.unit_samples, len(layout.timesteps), c, h, w),
                compressors=compressors,
                filters=filters,
                fill_value=float("nan"),
                dimension_names=DIMS,
                attributes={"coordinates": "image_id view flipped label", "block": name},
            )
            write_1d(g, "sample", np.arange(n, dtype=np.int64), "sample")
            write_1d(g, "timestep", np.asarray(layout.timesteps, dtype=np.int64), "timestep")
            write_1d(g, "image_id", samples.image_id, "sample", dtype=str)
            for coord in ("view", "flipped", "label"):
                write_1d(g, coord, root[coord][:], "sample")
        meta = dict(attrs)
        meta.update({
            "format_version": pipeline.FORMAT_VERSION,
            "diffprobe_version": pipeline.__version__,
            "layout": {"n_samples": n, "unit_samples": layout.unit_samples, "n_units": layout.n_units,
                       "dtype": layout.dtype, "storage_dtype": storage_dtype,
                       "chunk_samples": layout.chunk_samples},
            "compression": asdict(compression),
            "complete": False,
        })
        meta["blocks"] = list(layout.blocks)
        coords = "image_id view flipped label" + (" " + " ".join(CROP_COORDS) if samples.crops is not None else "")
        root.attrs.update({ATTR_KEY: jsonable(meta), "coordinates": f"{coords} class_name"})
        # Consolidated now as well as at finalize: the schema never changes after this
        # (writers add data only), and xarray warns on every open of an unconsolidated
        # store, so a store being written (or left incomplete) opens as quietly as a finished one.
        import zarr

        with quiet_zarr():
            zarr.consolidate_metadata(root.store)


@contextlib.contextmanager
def new_group(path: str | Path):
    """Yield a new Zarr v3 group built in a temporary folder, then renamed to ``path``.

    The write protocol's atomic schema step, for every store kind: readers never see
    a half-built schema. If another process renamed its group into place first, its
    group is kept (the caller compares the stage hash); a failed build leaves nothing,
    and the temp folders of builders that were killed are removed by the next build.
    """
    import zarr

    from pipeline.faults import kill_point
    from pipeline.store.locks import remove_stale_temps, temp_path

    path = location.as_location(path)
    if location.is_remote(path):  # no rename on object storage: see location.py's protocol
        memory = zarr.storage.MemoryStore()
        with quiet_zarr():
            yield zarr.open_group(memory, mode="w", zarr_format=3)
        location.commit_remote_group(path, memory)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        with quiet_zarr():
            yield zarr.open_group(str(tmp), mode="w", zarr_format=3)
        kill_point("schema:build")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "zarr.json").exists():
            raise


def create_status_arrays(root, n: int, unit_samples: int) -> None:
    """The per-sample ``done`` flag (pending / written / failed) and ``failure`` reason, one chunk per unit."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    per_unit = {"chunks": (unit_samples,), "dimension_names": ("sample",)}
    # crc32c: a flipped byte in a zstd frame without checksum can decode to a wrong flag
    root.create_array("done", shape=(n,), dtype="int8", fill_value=PENDING, **per_unit,
                      compressors=[ZstdCodec(), Crc32cCodec()],
                      attributes={"flag_values": [PENDING, WRITTEN, FAILED],
                                  "flag_meanings": "pending written failed"})
    root.create_array("failure", shape=(n,), dtype=str, fill_value="", **per_unit)


def jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def read_attrs(path: str | Path) -> dict | None:
    """The diffprobe attrs of a store or results folder, or None when it is not ours."""
    meta = location.as_location(path) / "zarr.json"
    if not meta.exists():
        return None
    try:
        doc = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"store {str(path)!r} has unreadable metadata ({exc}); delete it and re-run") from None
    return doc.get("attributes", {}).get(ATTR_KEY)


def open_root(path: str | Path, mode: str = "r"):
    import zarr

    if read_attrs(path) is None:
        raise StoreError(f"{str(path)!r} is not a diffprobe store (no zarr.json with diffprobe attrs)")
    zstore = location.zarr_store(path, read_only=mode == "r")
    with quiet_zarr():
        try:
            return zarr.open_group(zstore, mode=mode, zarr_format=3)
        except Exception:
            if type(zstore).__name__ != "ObjectStore":
                raise
            # read_attrs reached the store through s3fs, which follows a bucket's region
            # redirect and reads more options; obstore may not (a region configured wrongly)
            return zarr.open_group(location.zarr_store(path, read_only=True, client="fsspec"), mode=mode,
                                   zarr_format=3)


def load_layout(path: str | Path) -> Layout:
    root = open_root(path)
    meta = root.attrs[ATTR_KEY]["layout"]
    blocks = {name: tuple(root[f"blocks/{name}/activations"].shape[2:]) for name in block_names(root)}
    return Layout(meta["n_samples"], meta["unit_samples"], tuple(int(t) for t in root["timestep"][:]),
                  blocks, meta["dtype"], meta["chunk_samples"])


def assigned_units(n_units: int, shard: tuple[int, int]) -> list[int]:
    """Units this process owns under ``--shard i/N``: u % N == i (disjoint, covering)."""
    i, n = shard
    return [u for u in range(n_units) if u % n == i]


def unit_status(path: str | Path) -> np.ndarray:
    """(n_units,) bool: which units are complete (every sample written or failed)."""
    from pipeline.store.checks import Integrity

    root = open_root(path)
    layout = root.attrs[ATTR_KEY]["layout"]
    done = Integrity(root, path).done()
    unit = layout["unit_samples"]
    return np.array([bool(np.all(done[s : s + unit] != PENDING)) for s in range(0, len(done), unit)])


def write_unit(
    root,
    layout: Layout,
    unit: int,
    data: Mapping[str, np.ndarray],
    failed: Mapping[int, str] | None = None,
    coords: Mapping[str, np.ndarray] | None = None,
    fence: Callable[[], bool] | None = None,
) -> bool:
    """Write one unit: every block's ``(U, T, C, H, W)`` data as whole shards, then ``done``.

    ``failed`` maps positions within the unit to a reason; those samples keep NaN
    data and are marked FAILED. ``coords`` are per-sample coordinates known only
    now, ``{name: (U,) array}`` (``CROP_COORDS``), written before ``done``.
    ``fence``: see :func:`mark_done`. Returns whether ``done`` was set.
    """
    start, stop = layout.unit_range(unit)
    for name, arr in data.items():
        expected = (stop - start, len(layout.timesteps), *layout.blocks[name])
        if arr.shape != expected:
            raise StoreError(f"unit {unit} block {name!r}: data shape {arr.shape} != {expected}")
        root[f"blocks/{name}/activations"][start:stop] = arr
    for name, values in (coords or {}).items():
        if name not in CROP_COORDS or len(values) != stop - start:
            raise StoreError(f"unit {unit}: coordinate {name!r} with {len(values)} values is not a unit's crops")
        root[name][start:stop] = values
    written = [root[f"blocks/{name}/activations"] for name in data] + [root[name] for name in coords or {}]
    return mark_done(root, start, stop, failed, written, fence)


def mark_done(root, start: int, stop: int, failed: Mapping[int, str] | None, written: Sequence,
              fence: Callable[[], bool] | None = None) -> bool:
    """Step 3 of the write protocol for samples ``[start, stop)``: make the data durable, then ``done``.

    ``written``: the zarr arrays the unit's data went to; their objects are fsynced
    (``pipeline.store.durable``), then ``failure`` and ``done`` are written and
    fsynced, so a ``done`` unit has its data on disk even after a power cut.
    ``failed`` maps positions within the range to a reason (marked FAILED).

    ``fence``: called once the data is durable, just before ``done`` is written; if it
    returns False (the writer's lease on the unit was taken over while it stalled),
    ``done`` is left as it is and False returned: the unit's new holder marks it.
    """
    from pipeline.faults import stall_point
    from pipeline.store.durable import sync_unit

    status = np.full(stop - start, WRITTEN, dtype=np.int8)
    flags = [root["done"]]
    if failed:
        reasons = np.full(stop - start, "", dtype=object)
        for pos, reason in failed.items():
            status[pos] = FAILED
            reasons[pos] = reason
        root["failure"][start:stop] = reasons
        flags.append(root["failure"])
    sync_unit(written, start, stop)
    stall_point("unit:before-done")
    if fence is not None and not fence():
        return False
    root["done"][start:stop] = status
    sync_unit(flags, start, stop)
    return True


def finalize(path: str | Path, extra_attrs: dict | None = None) -> bool:
    """If every unit is done: consolidate metadata and stamp ``complete``. One process wins.

    Safe to repeat: every step rewrites the same content, and ``complete`` is set last,
    in one atomic replace of the root ``zarr.json``, so a process killed at any point
    leaves a store that the next ``finalize`` completes. Finishers take turns through
    a lock file beside the store (``pipeline.store.locks``); a lock left by a dead
    process is taken over. Returns True if this call (or an earlier one) completed the store.
    """
    import zarr

    from pipeline.faults import kill_point
    from pipeline.store.locks import finalize_lock, remove_stale_temps

    path = location.as_location(path)
    attrs = read_attrs(path) or {}
    if attrs.get("complete"):
        return True
    if not unit_status(path).all():
        return False
    if location.is_remote(path):
        claim = location.claim_finalize(path)
        if claim is None:
            return True  # another process is finalizing
        try:
            _stamp_complete(path, extra_attrs)
        finally:
            location.remove(claim)
        return True
    remove_stale_temps(path)
    with finalize_lock(path, finished=lambda: bool((read_attrs(path) or {}).get("complete"))) as held:
        if not held or (read_attrs(path) or {}).get("complete"):
            return True
        root = open_root(path, mode="r+")
        meta = _final_attrs(root, extra_attrs, complete=False)
        root.attrs[ATTR_KEY] = jsonable(meta)
        kill_point("finalize:consolidate")
        with quiet_zarr():
            zarr.consolidate_metadata(str(path))
        kill_point("finalize:stamp")
        stamp_attrs(path, {"complete": True})
    return True


def stamp_attrs(path: str | Path, update: Mapping[str, Any]) -> None:
    """Merge ``update`` into the root's diffprobe attrs in one atomic, durable replace of ``zarr.json``
    (consolidated metadata and everything else in it kept as they are)."""
    from pipeline.store.durable import fsync_path

    path = location.as_location(path)
    meta_path = path / "zarr.json"
    doc = json.loads(meta_path.read_text())
    attributes = doc.setdefault("attributes", {})
    attributes[ATTR_KEY] = jsonable({**attributes.get(ATTR_KEY, {}), **update})
    if location.is_remote(path):  # one PUT replaces an object whole
        meta_path.write_text(json.dumps(doc, indent=2))
        return
    tmp = meta_path.with_name(f"zarr.json.{uuid.uuid4().hex}.partial")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, meta_path)
    fsync_path(meta_path.parent)


def _final_attrs(root, extra_attrs: dict | None, complete: bool) -> dict:
    """The root attrs a finished store carries, extras merged; writes the ``failed_images``
    group (``pipeline.store.failures``: its own arrays, not in the attrs every open reads)."""
    from pipeline.store.failures import COUNT_ATTR, collect_failed_images, write_failed_images

    meta = dict(root.attrs[ATTR_KEY])
    failed = collect_failed_images(root)
    with quiet_zarr():
        write_failed_images(root, failed)
    meta.pop("failed_images", None)
    meta[COUNT_ATTR] = len(failed)
    meta.update(extra_attrs or {})
    meta["complete"] = complete
    return meta


def _stamp_complete(path, extra_attrs: dict | None) -> None:
    """Object storage's finalize (``location.claim_finalize`` holds the claim)."""
    import zarr

    root = open_root(path, mode="r+")
    root.attrs[ATTR_KEY] = jsonable(_final_attrs(root, extra_attrs, complete=True))
    with quiet_zarr():
        zarr.consolidate_metadata(location.zarr_store(path))


def stored_bytes(path: str | Path) -> int:
    return location.stored_bytes(location.as_location(path))


def estimate_compressed_bytes(layout: Layout, sample: np.ndarray | None = None,
                              compression: Compression = Compression()) -> int:
    """Bytes on disk for ``layout``: raw size times the codec ratio measured on ``sample``
    (a representative (n, C, H, W) activation array), or raw size if none is given."""
    raw = layout.bytes_per_sample() * layout.n_samples
    if sample is None:
        return raw
    import numcodecs

    if compression.cname == "none":
        return raw
    buf = np.ascontiguousarray(sample.astype(STORAGE_DTYPES[layout.dtype]))
    codec = numcodecs.Blosc(cname=compression.cname, clevel=compression.clevel,
                            shuffle=numcodecs.Blosc.BITSHUFFLE if compression.shuffle == "bitshuffle"
                            else numcodecs.Blosc.SHUFFLE)
    ratio = len(codec.encode(buf)) / max(1, buf.nbytes)
    return int(raw * ratio)


class UnitWriter:
    """One thread that writes finished units while the device computes the next.

    ``write(unit, payload)`` does the writing (whole shards, then ``done``). At most
    one unit waits in the queue, so memory stays at ~2 units. A writer error is
    re-raised in the caller at the next ``put`` or at ``close``; ``close`` drains the
    queue, so every unit handed over before an interruption is durable and marked done.
    """

    def __init__(self, write: Callable[[int, Any], None], name: str = "diffprobe-writer"):
        from pipeline.faults import with_kill_after_units

        self.write = with_kill_after_units(write)
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            unit, payload = item
            try:
                self.write(unit, payload)
            except BaseException as exc:  # noqa: BLE001 -- re-raised in the main thread
                self.error = exc

    def put(self, unit: int, payload: Any) -> None:
        if self.error:
            raise self.error
        self.queue.put((unit, payload))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def write_results_dataset(ds, output: str | Path, complete: bool) -> None:
    """Write a results Dataset (probe, cka) into the stage output folder ``output``.

    The stamp in ``ds.attrs["diffprobe"]`` is written with ``complete=False`` first,
    metadata is consolidated (so readers never list the plain files, CSV and PNG, kept
    beside the arrays), and ``complete`` is set last, atomically (``stamp_attrs``): a
    kill at any point leaves an incomplete output that a re-run rewrites.
    """
    import zarr

    from zarr.codecs import Crc32cCodec, ZstdCodec

    from pipeline.faults import kill_point

    zarr_store = location.zarr_store
    meta = dict(ds.attrs.get(ATTR_KEY, {}))
    stage = meta.get("stage", "results")  # names the kill points (pipeline.faults): <stage>:results:*
    kill_point(f"{stage}:results:write")
    ds = ds.copy()
    ds.attrs[ATTR_KEY] = meta | {"complete": False}
    # strings as fixed-width <U (read back as plain str, as write_1d's coordinates)
    for name, var in ds.variables.items():
        if var.dtype.kind in "OTU" and var.size and all(isinstance(v, str) for v in var.values.ravel()):
            width = max(1, max(len(v) for v in var.values.ravel()))
            ds[name] = var.astype(f"<U{width}")
    # crc32c on new arrays (a flipped byte in a bare zstd frame can decode to a wrong number),
    # and every chunk stored, NaN-only ones too, so `diffprobe verify` can require them all.
    fresh = [name for name in ds.variables
             if not (location.as_location(output) / str(name) / "zarr.json").exists()]
    encoding = {name: {"compressors": (ZstdCodec(), Crc32cCodec())} for name in fresh}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr notes the plain files while listing the folder
        ds.to_zarr(zarr_store(output), mode="a", consolidated=False, encoding=encoding, write_empty_chunks=True)
        if location.is_remote(output):  # no atomic replace of zarr.json there: stamp, then consolidate
            group = zarr.open_group(zarr_store(output), mode="r+", zarr_format=3)
            group.attrs[ATTR_KEY] = jsonable(meta | {"complete": complete})
            zarr.consolidate_metadata(zarr_store(output))
            return
        kill_point(f"{stage}:results:consolidate")
        zarr.consolidate_metadata(str(output))
    kill_point(f"{stage}:results:stamp")
    stamp_attrs(output, {"complete": complete})
