"""Probe results: the accuracy Dataset, its CSV and heatmaps, and ``diffprobe results``.

A probe stage's output folder ``<name>.probe/`` is a consolidated Zarr group holding
one xarray Dataset (``xr.open_zarr(path)``), plus plain files beside it::

    zarr.json, accuracy/, top5/, ...   the Dataset; root attrs carry ``diffprobe``
    results.csv                        one row per cell, every metric, status, error
    figures/heatmap_<head>.png         block x timestep, best pool per cell
    tasks/<block>__p<pool>.json        finished task results (resume)

Dataset variables, dims ``(block, timestep, pool, head)``, NaN where a cell is not
in the grid (a head limited to some pools) or failed:

``accuracy``      top-1 on the test split, fraction in [0, 1]
``top5``          top-5 (top-min(5, classes)), fraction
``val_accuracy``  best validation top-1 (NaN without validation)
``train_time_s``  the head's own compute time, seconds
``epochs_run``, ``best_epoch``
``n_test``, ``n_val``  samples the cell was scored / validated on (for confidence intervals)

``head_kind (head)`` names each head's kind (linear, mlp, cnn, attention).
Readers use the consolidated metadata, so the plain files beside it are never listed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import StoreError
from pipeline.store.layout import ATTR_KEY, read_attrs, write_results_dataset
from pipeline.store.location import as_location, save_figure, write_csv, zarr_store

#: Dataset variable -> key of ``pipeline.probing.training.train_heads``' result dicts.
METRICS = {
    "accuracy": "top1",
    "top5": "top5",
    "val_accuracy": "val_top1",
    "train_time_s": "train_time_s",
    "epochs_run": "epochs_run",
    "best_epoch": "best_epoch",
    "n_test": "n_test",
    "n_val": "n_val",
}
DIMS = ("block", "timestep", "pool", "head")


def results_dataset(
    rows: Sequence[Mapping],
    blocks: Sequence[str],
    timesteps: Sequence[int],
    pools: Sequence[int],
    head_kinds: Mapping[str, str],
    attrs: dict | None = None,
):
    """Assemble cell rows (dicts with block, timestep, pool, head and the metric keys) into a Dataset."""
    import xarray as xr

    shape = (len(blocks), len(timesteps), len(pools), len(head_kinds))
    where = {
        "block": {b: i for i, b in enumerate(blocks)},
        "timestep": {int(t): i for i, t in enumerate(timesteps)},
        "pool": {int(p): i for i, p in enumerate(pools)},
        "head": {h: i for i, h in enumerate(head_kinds)},
    }
    values = {name: np.full(shape, np.nan) for name in METRICS}
    for row in rows:
        if row.get("status") == "failed":
            continue
        cell = (where["block"][row["block"]], where["timestep"][int(row["timestep"])],
                where["pool"][int(row["pool"])], where["head"][row["head"]])
        for name, key in METRICS.items():
            values[name][cell] = row[key]
    ds = xr.Dataset(
        {name: (DIMS, v) for name, v in values.items()},
        coords={
            "block": np.asarray(list(blocks), dtype=object),
            "timestep": np.asarray(timesteps, dtype=np.int64),
            "pool": np.asarray(pools, dtype=np.int64),
            "head": np.asarray(list(head_kinds), dtype=object),
            "head_kind": ("head", np.asarray(list(head_kinds.values()), dtype=object)),
        },
        attrs=attrs or {},
    )
    ds["accuracy"].attrs["long_name"] = "top-1 accuracy on the test split (fraction)"
    ds["top5"].attrs["long_name"] = "top-5 accuracy on the test split (fraction)"
    ds["train_time_s"].attrs["units"] = "s"
    return ds


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def save_heatmaps(ds, folder: str | Path) -> list[Path]:
    """One PNG per head: block (rows) x timestep (columns), best pool per cell, annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = as_location(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for head in ds["head"].values:
        acc = ds["accuracy"].sel(head=head)
        filled = acc.fillna(-1.0)
        best = filled.max("pool").values
        best_pool = ds["pool"].values[filled.argmax("pool").values]
        n_b, n_t = best.shape
        fig, ax = plt.subplots(figsize=(3.0 + 0.9 * n_t, 1.4 + 0.5 * n_b))
        shown = np.where(best < 0, np.nan, best * 100)
        lo, hi = (np.nanmin(shown), np.nanmax(shown)) if np.isfinite(shown).any() else (0.0, 100.0)
        image = ax.imshow(shown, cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-6), aspect="auto")
        for i in range(n_b):
            for j in range(n_t):
                if best[i, j] >= 0:
                    bright = (shown[i, j] - lo) / max(hi - lo, 1e-6) > 0.6
                    ax.text(j, i, f"{shown[i, j]:.1f}\np{best_pool[i, j]}", ha="center", va="center",
                            fontsize=7, color="black" if bright else "white")
        ax.set_xticks(range(n_t), [str(t) for t in ds["timestep"].values])
        ax.set_yticks(range(n_b), [str(b) for b in ds["block"].values])
        ax.set_xlabel("timestep")
        ax.set_title(f"{head} ({ds['head_kind'].sel(head=head).item()}): top-1 %, best pool")
        fig.colorbar(image, ax=ax, label="top-1 %")
        fig.tight_layout()
        path = folder / f"heatmap_{_safe(str(head))}.png"
        save_figure(fig, path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_results(output: str | Path, ds, rows: Sequence[Mapping], complete: bool) -> None:
    """Write CSV, heatmaps and the Dataset into ``output`` (an existing results group), then stamp attrs.

    ``ds.attrs["diffprobe"]`` is written with ``complete``; metadata is consolidated last,
    so readers never list the plain files beside the Zarr arrays.
    """
    import pandas as pd

    output = as_location(output)
    write_csv(pd.DataFrame(list(rows)), output / "results.csv")
    save_heatmaps(ds, output / "figures")
    write_results_dataset(ds, output, complete)


def open_results(path: str | Path):
    """The Dataset of a probe stage's output folder (loaded into memory)."""
    import xarray as xr

    if not as_location(path).exists():
        raise StoreError(f"{str(path)!r} does not exist; give a probe stage's output folder (<name>.probe)")
    attrs = read_attrs(path)
    if attrs is None or attrs.get("stage") != "probe":
        raise StoreError(f"{str(path)!r} is not a probe stage's output (a <name>.probe folder)")
    if not (as_location(path) / "accuracy").exists():
        raise StoreError(f"{str(path)!r} has no results yet (the probe stage has not finished); run it first")
    ds = xr.open_zarr(zarr_store(path, read_only=True), chunks=None).load()
    return plain_strings(ds)


def plain_strings(ds):
    """``ds`` with its string coordinates as object arrays of str.

    Results written now store strings fixed-width (read back as ``<U``, plain str);
    stores written before hold Zarr v3 variable-length strings, which zarr-python reads
    as numpy's StringDType and pandas indexes warn about (``.where(drop=True)``,
    ``groupby``): those are converted here."""
    strings = {name: ds[name].astype(object) for name in ds.coords if ds[name].dtype.kind == "T"}
    return ds.assign_coords(strings) if strings else ds


def results_table(ds):
    """Every trained cell as a DataFrame, best accuracy first (percentages)."""
    df = ds[list(METRICS)].to_dataframe().reset_index()
    df = df.dropna(subset=["accuracy"])
    df["head_kind"] = df["head"].map(dict(zip(ds["head"].values, ds["head_kind"].values)))
    for col in ("accuracy", "top5", "val_accuracy"):
        df[col] = (df[col] * 100).round(2)
    df = df.rename(columns={"accuracy": "top1_%", "top5": "top5_%", "val_accuracy": "val_%"})
    df["epochs_run"] = df["epochs_run"].astype(int)
    df["train_time_s"] = df["train_time_s"].round(2)
    columns = ["block", "timestep", "pool", "head", "head_kind", "top1_%", "top5_%", "val_%", "epochs_run",
               "train_time_s"]
    return df[columns].sort_values("top1_%", ascending=False, kind="stable").reset_index(drop=True)


def best_cells(ds) -> list[dict]:
    """The best cell per head, best first: dicts with block, timestep, pool, head, accuracy."""
    out = []
    for head in ds["head"].values:
        acc = ds["accuracy"].sel(head=head)
        if not np.isfinite(acc.values).any():
            continue
        flat = int(np.nanargmax(acc.values))
        b, t, p = np.unravel_index(flat, acc.shape)
        out.append({
            "head": str(head), "block": str(ds["block"].values[b]), "timestep": int(ds["timestep"].values[t]),
            "pool": int(ds["pool"].values[p]), "accuracy": float(acc.values[b, t, p]),
            "top5": float(ds["top5"].sel(head=head).values[b, t, p]),
        })
    return sorted(out, key=lambda c: -c["accuracy"])


def describe_best(cell: Mapping) -> str:
    return (f"{cell['head']}: block {cell['block']}, t={cell['timestep']}, "
            f"pool {cell['pool']}x{cell['pool']}: "
            f"top-1 {cell['accuracy'] * 100:.2f} %, top-5 {cell['top5'] * 100:.2f} %")


def format_results(path: str | Path, top: int | None = None) -> str:
    """The text ``diffprobe results PATH`` prints: the cell table, then the best cell per head."""
    ds = open_results(path)
    attrs = ds.attrs.get(ATTR_KEY, {})
    table = results_table(ds)
    lines = [f"probe {attrs.get('stage_name', '?')!r} ({path}); {len(table)} cells"
             + ("" if attrs.get("complete") else "  ** INCOMPLETE: some cells failed **")]
    shown = table if top is None else table.head(top)
    lines.append(shown.to_string(index=False) if len(shown) else "(no trained cells)")
    best = best_cells(ds)
    if best:
        lines.append("best per head:")
        lines += [f"  {describe_best(c)}" for c in best]
    for failure in attrs.get("failed", []):
        lines.append(f"FAILED {failure['group']}: {failure['error']}")
    return "\n".join(lines)
