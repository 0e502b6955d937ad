"""``diffprobe diff A B``: how far two outputs of the same stage differ, for reproducibility checks.

Unit stores (extract, pool, classify) are compared array by array and, for
activations, timestep by timestep: the largest absolute difference, the largest
relative one (``|a - b| / max(|a|, |b|)`` where either is non-zero) and how many
values lie outside ``atol + rtol * |b|`` (NaN in both places counts as equal: a
failed sample; NaN in one only is a difference). Results folders (probe, cka) are
compared per data variable. Sample coordinates must match. Either output may be a
folder or a URL (``s3://...``), e.g. a run on a GPU node's object store against one on local disk. Reads go through
:mod:`pipeline.store.checks`, so damage is named, never compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import StoreError
from pipeline.store import checks as chk
from pipeline.store.layout import open_root, read_attrs
from pipeline.store.location import as_location, zarr_store


@dataclass
class Row:
    """One compared slice: ``what`` (block / array / variable), ``timestep`` (or None)."""

    what: str
    timestep: int | None
    max_abs: float
    max_rel: float
    n_outside: int
    n_values: int


class _Stats:
    def __init__(self):
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.outside = 0
        self.count = 0

    def add(self, a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> None:
        a = np.asarray(a, dtype=np.float64).ravel()
        b = np.asarray(b, dtype=np.float64).ravel()
        self.count += a.size
        nan_a, nan_b = np.isnan(a), np.isnan(b)
        one_nan = nan_a != nan_b
        both = ~(nan_a | nan_b)
        diff = np.abs(a[both] - b[both])
        if one_nan.any():
            self.max_abs = self.max_rel = float("inf")
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            scale = np.maximum(np.abs(a[both]), np.abs(b[both]))
            nz = scale > 0
            if nz.any():
                self.max_rel = max(self.max_rel, float((diff[nz] / scale[nz]).max()))
        self.outside += int(one_nan.sum()) + int((diff > atol + rtol * np.abs(b[both])).sum())

    def row(self, what: str, timestep: int | None) -> Row:
        return Row(what, timestep, self.max_abs, self.max_rel, self.outside, self.count)


def _kind(path: Path) -> tuple[dict, object]:
    attrs = read_attrs(path)
    if attrs is None:
        raise StoreError(f"{str(path)!r} is not a diffprobe output (no zarr.json with diffprobe attrs)")
    return attrs, open_root(path)


def diff_outputs(a: str | Path, b: str | Path, atol: float = 0.0, rtol: float = 0.0) -> list[Row]:
    """Rows of differences between outputs ``a`` and ``b`` (see the module docstring)."""
    a, b = as_location(a), as_location(b)
    for p in (a, b):
        if not p.exists() and not (p / "zarr.json").exists():  # an S3 prefix exists only by its objects
            raise StoreError(f"store {str(p)!r} does not exist")
    attrs_a, root_a = _kind(a)
    attrs_b, root_b = _kind(b)
    if attrs_a.get("stage") != attrs_b.get("stage"):
        raise StoreError(f"{a} is a {attrs_a.get('stage')!r} output and {b} a {attrs_b.get('stage')!r} one; "
                         "diff compares outputs of the same stage kind")
    if "done" in root_a and "done" in root_b:
        return _unit_stores(root_a, a, root_b, b, atol, rtol)
    return _results(a, b, atol, rtol)


def _unit_stores(root_a, a: Path, root_b, b: Path, atol: float, rtol: float) -> list[Row]:
    ca, cb = chk.Integrity(root_a, a), chk.Integrity(root_b, b)
    ids_a, ids_b = root_a["image_id"][:].tolist(), root_b["image_id"][:].tolist()
    if ids_a != ids_b:
        raise StoreError(f"{a} and {b} hold different samples ({len(ids_a)} vs {len(ids_b)} image ids, or in "
                         "another order); diff compares stores of the same dataset selection")
    done_a, done_b = ca.done(), cb.done()
    if not np.array_equal(done_a, done_b):
        raise StoreError(f"{a} and {b} differ in which samples are done ({int((done_a != done_b).sum())} "
                         "sample(s)); finish both, or compare complete stores")
    paths_a, paths_b = chk.data_arrays(root_a), chk.data_arrays(root_b)
    if paths_a != paths_b:
        raise StoreError(f"{a} and {b} hold different arrays: {sorted(set(paths_a) ^ set(paths_b))}")
    ca.check_present()
    cb.check_present()
    timesteps = [int(t) for t in root_a["timestep"][:]] if "timestep" in root_a else []
    rows = []
    for path in paths_a:
        xa, xb = ca.array(path), cb.array(path)
        if xa.shape != xb.shape:
            raise StoreError(f"{ca.label(path)}: shape {xa.shape} in {a} but {xb.shape} in {b}")
        unit = int(xa.zarr.metadata.chunk_grid.chunk_shape[0])
        per_t = path.endswith("/activations")
        stats = [_Stats() for _ in (timesteps if per_t else [None])]
        for lo in range(0, xa.shape[0], unit):
            hi = min(lo + unit, xa.shape[0])
            va, vb = np.asarray(xa[lo:hi]), np.asarray(xb[lo:hi])
            if per_t:
                for ti, s in enumerate(stats):
                    s.add(va[:, ti], vb[:, ti], atol, rtol)
            else:
                stats[0].add(va, vb, atol, rtol)
        name = ca.label(path)
        rows += [s.row(name, timesteps[i] if per_t else None) for i, s in enumerate(stats)]
    return rows


def _results(a: Path, b: Path, atol: float, rtol: float) -> list[Row]:
    import xarray as xr

    from pipeline.store.layout import quiet_zarr

    with quiet_zarr():
        da, db = xr.open_zarr(zarr_store(a, read_only=True)), xr.open_zarr(zarr_store(b, read_only=True))
    names = sorted(set(da.data_vars) | set(db.data_vars))
    rows = []
    for name in names:
        if name not in da or name not in db:
            raise StoreError(f"variable {name!r} is in only one of {a} and {b}")
        try:
            va, vb = da[name].values, db[name].values
        except Exception as exc:  # noqa: BLE001 -- a codec failure
            raise StoreError(f"variable {name!r} cannot be read ({chk.decode_failure(exc)}); "
                             f"'diffprobe verify' each output to find the damage") from None
        if va.shape != vb.shape:
            raise StoreError(f"variable {name!r}: shape {va.shape} in {a} but {vb.shape} in {b}")
        s = _Stats()
        if va.dtype.kind in "fiub" and vb.dtype.kind in "fiub":
            s.add(va, vb, atol, rtol)
        else:
            s.count = va.size
            s.outside = int(sum(x != y for x, y in zip(va.ravel().tolist(), vb.ravel().tolist())))
            s.max_abs = s.max_rel = float("inf") if s.outside else 0.0
        rows.append(s.row(f"variable {name!r}", None))
    return rows


def format_rows(rows: list[Row], atol: float, rtol: float) -> str:
    """The table ``diffprobe diff`` prints, and its verdict."""
    width = max([len(r.what) for r in rows] + [5])
    lines = [f"{'slice':<{width}} {'timestep':>8} {'max abs':>11} {'max rel':>11} {'outside':>9} {'values':>10}"]
    for r in rows:
        t = "" if r.timestep is None else str(r.timestep)
        lines.append(f"{r.what:<{width}} {t:>8} {r.max_abs:>11.4g} {r.max_rel:>11.4g} {r.n_outside:>9} {r.n_values:>10}")
    differ = [r for r in rows if r.n_outside]
    verdict = (f"identical within atol={atol:g}, rtol={rtol:g}" if not differ else
               f"{len(differ)} of {len(rows)} slice(s) differ beyond atol={atol:g}, rtol={rtol:g}")
    return "\n".join(lines + [verdict])
