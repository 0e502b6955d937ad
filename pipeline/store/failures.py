"""The images a stage could not read, kept in their own small group beside the root.

A unit store records each failed sample in its ``failure`` array (the reason, ``""``
when the sample was written). At finalize the distinct failed images are listed once
more, for people and reports, in the group ``failed_images/``::

    failed_images/image_id   (failed,) str   one entry per image (its views share it)
    failed_images/reason     (failed,) str   the decoder's message

and the root attrs keep only the count, ``diffprobe.n_failed_images``. The list used to
live in the root attrs, which every open of the store reads (the root ``zarr.json``):
at 100k failures that was 2 s per open. It reads with plain zarr
(``root["failed_images/image_id"][:]``) or xarray
(``xr.open_zarr(path, group="failed_images")``). Stores written before the move keep
their list in ``attrs.diffprobe.failed_images``; :func:`read_failed_images` reads both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.store.schema import ATTR_KEY

#: The group beside the root that lists the failed images.
GROUP = "failed_images"
#: The root attr holding how many there are.
COUNT_ATTR = "n_failed_images"


def collect_failed_images(root) -> list[dict]:
    """``[{"image_id", "reason"}]`` of every failed image of an open unit store, in store order
    (an image with several failed views once, with its first view's reason)."""
    reasons = np.asarray(root["failure"][:], dtype=object)
    rows = np.flatnonzero(reasons != "")
    if not len(rows):
        return []
    ids = np.asarray(root["image_id"][:], dtype=object)[rows]
    first = {}
    for image_id, reason in zip(ids.tolist(), reasons[rows].tolist()):
        first.setdefault(str(image_id), str(reason))
    return [{"image_id": i, "reason": r} for i, r in first.items()]


def write_failed_images(root, items: list[dict]) -> None:
    """(Re)write the ``failed_images`` group of an open root (mode ``r+``); safe to repeat."""
    group = root.create_group(GROUP, overwrite=True)
    for name, key in (("image_id", "image_id"), ("reason", "reason")):
        values = np.asarray([item[key] for item in items], dtype=object)
        array = group.create_array(name, shape=values.shape, dtype=str, chunks=(max(1, len(values)),),
                                   dimension_names=("failed",), fill_value="")
        if len(values):
            array[:] = values


def read_failed_images(path: str | Path, limit: int | None = None) -> list[dict]:
    """The failed images of the store at ``path`` (``limit``: at most that many), ``[]`` when none.

    Reads the ``failed_images`` group, or the attrs list of a store written before it.
    """
    import json

    import zarr

    from pipeline.store.location import as_location, zarr_store

    meta = as_location(path) / "zarr.json"
    attrs = json.loads(meta.read_text()).get("attributes", {}).get(ATTR_KEY, {}) if meta.exists() else {}
    if "failed_images" in attrs:  # a store written before the list had its own group
        return list(attrs["failed_images"])[:limit]
    if not attrs.get(COUNT_ATTR):
        return []
    root = zarr.open_group(zarr_store(path, read_only=True), mode="r", zarr_format=3)
    if GROUP not in root:
        return []
    group = root[GROUP]
    stop = min(limit, group["image_id"].shape[0]) if limit is not None else None
    ids, reasons = group["image_id"][:stop], group["reason"][:stop]
    return [{"image_id": str(i), "reason": str(r)} for i, r in zip(ids, reasons)]


def count_failed_images(attrs: dict) -> int:
    """How many images failed, from a store's diffprobe attrs (either format)."""
    if "failed_images" in attrs:
        return len(attrs["failed_images"])
    return int(attrs.get(COUNT_ATTR) or 0)
