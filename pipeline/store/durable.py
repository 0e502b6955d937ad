"""Making a unit durable: fsync its chunk files and their folders before and after ``done``.

zarr's LocalStore writes each chunk or shard to a temp file and renames it into
place, so a killed process leaves the old object or the new one, never half of
one; it does not fsync, though, so after a power cut a renamed file can be empty
or missing while a later ``done`` chunk made it to disk. The write protocol
therefore syncs a unit's data files (and the folders holding their names) before
its ``done`` cells are written, then syncs the ``done`` chunk itself.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable
from pathlib import Path


def array_folder(array) -> Path | None:
    """The folder of a zarr array in a local store; None on object storage (no files to sync)."""
    root = getattr(array.store, "root", None)
    return None if root is None or not isinstance(root, (str, Path)) else Path(root) / array.path


def chunk_files(array, start: int, stop: int) -> list[Path]:
    """Files of ``array``'s stored objects (shards if sharded, else chunks) holding samples
    ``[start, stop)`` along the first axis, all of the other axes; only those that exist."""
    outer = array.metadata.chunk_grid.chunk_shape  # the shard shape when sharded
    if not array.shape or stop <= start:
        return []
    first = range(start // outer[0], math.ceil(stop / outer[0]))
    rest = [range(math.ceil(n / c)) for n, c in zip(array.shape[1:], outer[1:])]
    folder = array_folder(array)
    if folder is None:
        return []  # object storage: a put is durable once it returns
    files = (folder / array.metadata.encode_chunk_key((i, *more))
             for i in first for more in itertools.product(*rest))
    return [f for f in files if f.exists()]


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list: the names renamed into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise  # some file systems cannot fsync a folder; a file must sync
    finally:
        os.close(fd)


def sync_files(files: Iterable[Path], up_to: Iterable[Path]) -> None:
    """fsync ``files``, then every folder from theirs up to (and including) the nearest of ``up_to``.

    New chunk folders (``c/7/0/...``) are created by the write, so their names must
    reach the disk as well as the files.
    """
    tops = [Path(p) for p in up_to]
    folders: set[Path] = set()
    for f in files:
        fsync_path(f)
        parent = f.parent
        while True:
            folders.add(parent)
            if parent in tops or parent == parent.parent:
                break
            parent = parent.parent
    for folder in sorted(folders, key=lambda p: -len(p.parts)):
        fsync_path(folder)


def sync_unit(arrays: Iterable, start: int, stop: int) -> None:
    """fsync the objects of ``arrays`` (zarr arrays of one local store) holding samples ``[start, stop)``."""
    for array in arrays:
        files = chunk_files(array, start, stop)
        if files:
            sync_files(files, [array_folder(array)])
