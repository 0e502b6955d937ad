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
    from pipeline.store.layout import quiet_zarr, write_1d

    with quiet_zarr():
        group = root.create_group(GROUP, overwrite=True)
        write_1d(group, "image_id", [i["image_id"] for i in items], "failed", dtype=str)
        write_1d(group, "reason", [i["reason"] for i in items], "failed", dtype=str)


def read_failed_images(path: str | Path, limit: int | None = None) -> list[dict]:
    """The failed images of the store at ``path`` (``limit``: at most that many), ``[]`` when none.

    Reads the ``failed_images`` group, or the attrs list of a store written before it.
    """
    from pipeline.store.layout import open_root, read_attrs

    attrs = read_attrs(path) or {}
    if "failed_images" in attrs:  # a store written before the list had its own group
        return list(attrs["failed_images"])[:limit]
    if not attrs.get(COUNT_ATTR):
        return []
    root = open_root(path)
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
