"""How much more disk an output needs: what the one-line "no space left" error says.

A unit store (extract, pool, classify) needs, for its units not yet done, what its done
units take on disk (allocated blocks: a small shard takes a whole file-system block),
or their raw size when none is done yet. Results folders (probe, cka) estimate their
total from their grid with :func:`results_bytes`; they are small next to the stores
they read, except cka's scratch Grams (8 n^2 bytes each).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: A file's allocation unit on most local file systems (ext4, xfs, tmpfs).
FILE_BLOCK = 4096
#: About what one results figure (a PNG heatmap or matrix) takes.
FIGURE_BYTES = 64 << 10


def allocated(file: Path) -> int:
    """Bytes ``file`` takes on its file system (at least its size)."""
    st = file.stat()
    return max(st.st_size, getattr(st, "st_blocks", 0) * 512)


def unit_bytes_needed(path: str | Path) -> int:
    """Bytes the units of the unit store at ``path`` that are not done yet will take; 0 when
    unknown (not a unit store, not created yet, or on object storage)."""
    from pipeline.store.checks import data_arrays
    from pipeline.store.durable import array_folder
    from pipeline.store.layout import open_root, unit_status

    try:
        status = unit_status(path)
        root = open_root(path)
        arrays = [root[name] for name in data_arrays(root)]
    except Exception:  # noqa: BLE001 -- not a unit store, or not created yet
        return 0
    done, left = int(status.sum()), int((~status).sum())
    folders = [f for f in map(array_folder, arrays) if f is not None]
    if done and folders:
        used = sum(allocated(f) for folder in folders for f in folder.rglob("*") if f.is_file())
        if used:
            return int(used / done * left)
    raw = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in arrays)
    return int(raw / max(1, len(status)) * left)


def results_bytes(n_variables: int, n_values: int, n_files: int, n_figures: int) -> int:
    """About what a results folder takes: ``n_variables`` arrays of ``n_values`` float64 each
    (a ``zarr.json`` and a chunk per array), ``n_files`` small files (CSV, task results) and
    ``n_figures`` PNGs."""
    arrays = n_variables * (2 * FILE_BLOCK + 8 * n_values)
    return arrays + n_files * FILE_BLOCK + n_figures * FIGURE_BYTES
