"""The store format: layout, codecs, the one write protocol, schemas and readers.

What lives here
---------------
- ``layout``: the activation store's schema (coordinates, ``done`` mask, chunks and
  shards), codecs, the one write protocol (create once, whole units, ``done`` after
  data, finalize once) and the small readers (``open_root``, ``read_attrs``).
- ``error_tensor``: the Diffusion Classifier's per-(sample, class, trial) error store,
  written with the same protocol.
- ``source``: ``ZarrSource``, minibatches streamed from a store slice for training.
- ``prefetch``: the helper that builds the source's blocks of rows ahead of use.
- ``samples``: ``read_samples``, a few samples' maps read by byte range through the shard
  index (about the bytes they hold, where whole-chunk reads take ~100x).
- ``slices``: names of stored feature slices (block, timestep, pool size).
- ``describe``: the human summary printed by ``diffprobe inspect``.
- ``schema``: the names every store shares (attrs key, ``done`` flags, block order) and
  the dataset identity formula (count + sha256 of the ordered ``(image_id, label)`` pairs).
- ``failures``: the list of images that could not be read (its own group, not root attrs).
- ``durable``: fsync of a unit's objects before and after its ``done`` cells.
- ``locks``: the finalize lock and schema temp folders, which name their owner and
  are taken over / removed once that owner is gone.
- ``checks``: what readers check (a damaged ``done``, a done unit's missing shard, a
  chunk failing its checksum), each one line naming block, timestep and samples.
- ``verify``, ``repair`` and ``diff``: ``diffprobe verify [--repair]`` and ``diffprobe diff``.
- ``location``: local paths and fsspec URLs (``s3://`` ...) as one kind of path, zarr
  stores on them, and the write protocol's object-storage steps (put-if-absent).

May import: ``pipeline.errors``, ``pipeline.noise``, numpy, zarr, xarray, fsspec, upath. Never
``stages``, the workflow machinery, models or the science packages.

The package namespace is the layout's public API, so ``from pipeline import store``
then ``store.create_store(...)`` reads as the protocol it is.
"""

from pipeline.store.layout import (
    ATTR_KEY,
    CROP_COORDS,
    DIMS,
    FAILED,
    PENDING,
    SAMPLE_COORDS,
    STORAGE_DTYPES,
    WRITTEN,
    Compression,
    Layout,
    SampleTable,
    UnitRanges,
    UnitWriter,
    assigned_units,
    block_names,
    codecs_for,
    create_status_arrays,
    create_store,
    estimate_compressed_bytes,
    finalize,
    jsonable,
    load_layout,
    mark_done,
    new_group,
    open_root,
    make_layout,
    quiet_zarr,
    read_attrs,
    read_sample_table,
    stamp_attrs,
    stored_bytes,
    unit_status,
    write_1d,
    write_results_dataset,
    write_unit,
)

__all__ = [
    "ATTR_KEY", "CROP_COORDS", "DIMS", "FAILED", "PENDING", "SAMPLE_COORDS", "STORAGE_DTYPES", "WRITTEN",
    "Compression", "Layout", "SampleTable", "UnitRanges", "UnitWriter", "assigned_units",
    "block_names", "codecs_for", "create_status_arrays", "create_store",
    "estimate_compressed_bytes", "finalize", "jsonable", "load_layout", "mark_done", "new_group",
    "open_root", "make_layout", "quiet_zarr", "read_attrs", "read_sample_table", "stamp_attrs", "stored_bytes",
    "unit_status",
    "write_1d", "write_results_dataset", "write_unit",
]
