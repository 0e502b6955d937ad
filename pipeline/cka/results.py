"""cka stage results: the ``cka (row, col)`` Dataset, its CSV and matrix PNG, and reading it back.

A cka stage's output folder ``<name>.cka/`` is a consolidated Zarr group holding one
xarray Dataset (``xr.open_zarr(path)["cka"]``), plus plain files beside it::

    zarr.json, cka/, row/, col/, row_*/, col_*/   the Dataset; root attrs carry ``diffprobe``
    cka.csv                                       one line per entry
    cka.png                                       the matrix, labelled, with a colorbar
    tasks/<task>.json                             finished task results (resume)

Coordinates: ``row`` / ``col`` (labels ``stage/block/t<t>[/p<size>]``) and, per
dimension, ``_stage``, ``_block``, ``_timestep``, ``_pool`` (map side), ``_features``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.cka.select import Representation
from pipeline.errors import StoreError
from pipeline.store.layout import read_attrs, write_results_dataset
from pipeline.store.location import save_figure, write_csv, zarr_store


def _coords(prefix: str, reps: list[Representation]) -> dict:
    return {
        prefix: np.array([r.label for r in reps], dtype=object),
        f"{prefix}_stage": (prefix, np.array([r.stage for r in reps], dtype=object)),
        f"{prefix}_block": (prefix, np.array([r.block for r in reps], dtype=object)),
        f"{prefix}_timestep": (prefix, np.array([r.timestep for r in reps], dtype=np.int64)),
        f"{prefix}_pool": (prefix, np.array([r.pool for r in reps], dtype=np.int64)),
        f"{prefix}_features": (prefix, np.array([r.n_features for r in reps], dtype=np.int64)),
    }


def cka_dataset(matrix: np.ndarray, rows: list[Representation], cols: list[Representation], attrs: dict):
    """The output Dataset: ``cka (row, col)`` float64 with the row/col coordinates."""
    import xarray as xr

    da = xr.DataArray(matrix, dims=("row", "col"), coords=_coords("row", rows) | _coords("col", cols),
                      name="cka", attrs={"long_name": "CKA", "units": "1"})
    ds = da.to_dataset()
    ds.attrs.update(attrs)
    return ds


def _tick_labels(reps: list[Representation]) -> tuple[list[str], str]:
    stages = {r.stage for r in reps}
    if len(stages) == 1:
        return [r.label.split("/", 1)[1] for r in reps], stages.pop()
    return [r.label for r in reps], ""


def save_matrix_png(ds, rows: list[Representation], cols: list[Representation], path: Path,
                    title: str) -> None:
    """The matrix as an image: labelled rows/columns (smaller and rotated when many), colorbar up to 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = ds["cka"].values
    m_r, m_c = values.shape
    most = max(m_r, m_c)
    font = max(4.0, min(9.0, 260.0 / most))
    cell = max(0.12, min(0.45, font / 20))
    fig, ax = plt.subplots(figsize=(min(40, 3.5 + cell * m_c), min(40, 2.5 + cell * m_r)))
    # minibatch CKA can dip below 0
    low = min(0.0, float(np.nanmin(values))) if np.isfinite(values).any() else 0.0
    image = ax.imshow(values, cmap="viridis", vmin=low, vmax=1.0, aspect="auto", interpolation="nearest")
    if most <= 12:
        for i in range(m_r):
            for j in range(m_c):
                if np.isfinite(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=font - 1,
                            color="black" if values[i, j] > 0.6 else "white")
    row_labels, row_stage = _tick_labels(rows)
    col_labels, col_stage = _tick_labels(cols)
    ax.set_yticks(range(m_r), row_labels, fontsize=font)
    ax.set_xticks(range(m_c), col_labels, fontsize=font, rotation=90 if m_c > 6 else 45,
                  ha="center" if m_c > 6 else "right")
    ax.set_ylabel(row_stage)
    ax.set_xlabel(col_stage)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="CKA", fraction=0.046, pad=0.04)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def write_cka_output(output: Path, ds, rows: list[Representation], cols: list[Representation], title: str,
                     complete: bool) -> None:
    """CSV, PNG and the Dataset into ``output`` (an existing group); stamp attrs and consolidate last."""
    import pandas as pd

    values = ds["cka"].values
    table = [{"row": r.label, "col": c.label, "cka": values[i, j],
              "row_stage": r.stage, "row_block": r.block, "row_timestep": r.timestep, "row_pool": r.pool,
              "col_stage": c.stage, "col_block": c.block, "col_timestep": c.timestep, "col_pool": c.pool}
             for i, r in enumerate(rows) for j, c in enumerate(cols)]
    write_csv(pd.DataFrame(table), output / "cka.csv")
    save_matrix_png(ds, rows, cols, output / "cka.png", title)
    write_results_dataset(ds, output, complete)


def open_cka(path: str | Path):
    """The ``cka (row, col)`` DataArray of a cka stage's output folder (loaded)."""
    import xarray as xr

    attrs = read_attrs(path)
    if attrs is None or attrs.get("stage") != "cka" or not attrs.get("complete"):
        raise StoreError(f"{str(path)!r} is not a finished cka stage output; run the stage first")
    return xr.open_zarr(zarr_store(path, read_only=True))["cka"].load()
