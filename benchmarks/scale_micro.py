"""What grows faster than N, one operation at a time: image-id set operations, the CKA alignment,
and the failed-image list in a store's root attrs.

    .venv/bin/python benchmarks/scale_micro.py [--sizes 10000,100000] [--store /tmp/dp-scale/n100000/out/extract.zarr]

Each row times the same operation at each N (best of 3) and gives the growth
(time at the largest N / time at the smallest, over the N ratio: ~1 is linear,
N log N is ~1.2 per decade; more is a defect). ``legacy`` rows are the code as it
was, for comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def ids_for(n: int) -> np.ndarray:
    """ImageNet-style ids as zarr returns them: an object array of str."""
    return np.asarray([f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(n)], dtype=object)


def best(fn, repeats: int = 3) -> float:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return min(out)


def legacy_split(ids: np.ndarray) -> None:
    """``split_by_image`` before the fix: ``np.isin`` over object arrays."""
    unique = np.unique(ids)
    rng = np.random.default_rng(0)
    np.isin(ids, unique[rng.permutation(len(unique))[: len(unique) // 5]])


def operations() -> dict:
    from pipeline.probing.splits import split_groups

    return {
        "split_groups (str codes; main)": lambda ids: split_groups(ids, 0.2, 0, 1, "train/test"),
        "legacy split_by_image (object isin)": legacy_split,
        "np.unique(object, return_inverse) (probe groups, before)": lambda ids: np.unique(ids, return_inverse=True),
        "np.unique(str, return_inverse) (probe groups, now)": lambda ids: np.unique(ids.astype(str),
                                                                                    return_inverse=True),
        "np.intersect1d(object) (test_input check, before)": lambda ids: np.intersect1d(ids, ids[::2]),
        "np.intersect1d(str) (test_input check, now)": lambda ids: np.intersect1d(ids.astype(str),
                                                                                 ids[::2].astype(str)),
    }


def failed_list_open(n_failed: int, folder: Path, legacy: bool = False) -> float:
    """Open a store root listing ``n_failed`` failed images: in its own group (now), or in the
    root attrs (``legacy``: what stores did before; zarr.json size grows with it)."""
    import zarr

    from pipeline.store.failures import COUNT_ATTR, write_failed_images
    from pipeline.store.layout import ATTR_KEY, open_root

    path = folder / f"f{n_failed}{'-legacy' if legacy else ''}.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    items = [{"image_id": f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG", "reason": "cannot identify image file"}
             for i in range(n_failed)]
    if legacy:
        root.attrs[ATTR_KEY] = {"stage": "extract", "failed_images": items}
    else:
        write_failed_images(root, items)
        root.attrs[ATTR_KEY] = {"stage": "extract", COUNT_ATTR: n_failed}
        zarr.consolidate_metadata(str(path))
    return best(lambda: open_root(path).attrs[ATTR_KEY])


def alignment_rows(store: Path) -> list[dict]:
    """align_samples on a real store pair vs loading the saved alignment (what each CKA task did / does)."""
    from pipeline.cka.select import align_samples, load_alignment, save_alignment

    pooled = store.parent / "pool.zarr"
    paths = [store, pooled] if pooled.exists() else [store]
    align_s = best(lambda: align_samples(paths), 2)
    with tempfile.TemporaryDirectory() as tmp:
        file = save_alignment(align_samples(paths), Path(tmp) / "a.npz")
        load_s = best(lambda: load_alignment(file))
    n = align_samples(paths).n
    return [{"operation": f"CKA task: align_samples over {len(paths)} stores (before, per task)", "n": n,
             "seconds": align_s},
            {"operation": "CKA task: load_alignment (now, per task; matched once per run)", "n": n,
             "seconds": load_s}]


def pool_read_rows(store: Path) -> list[dict]:
    """One pool task's read of unit 0 of one block: the whole block opened lazily (before) vs the unit's chunks."""
    import xarray as xr

    from pipeline.store.layout import block_names, load_layout, open_root, quiet_zarr

    root = open_root(store)
    block = block_names(root)[0]
    lay = load_layout(store)
    start, stop = lay.unit_range(0)
    timesteps = list(lay.timesteps)

    def before():
        with quiet_zarr():
            ds = xr.open_zarr(str(store), group=f"blocks/{block}")
        return ds["activations"].isel(sample=slice(start, stop)).sel(timestep=timesteps).values

    def now():
        arr = open_root(store)[f"blocks/{block}/activations"]
        return arr[start:stop]

    n = lay.n_samples
    return [{"operation": "pool task: xr.open_zarr(block) + isel(unit) (before)", "n": n, "seconds": best(before)},
            {"operation": "pool task: the unit's chunks through zarr (now)", "n": n, "seconds": best(now)}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--store", type=Path, default=None, help="an extraction store for the alignment rows")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    data = {n: ids_for(n) for n in sizes}
    print("| operation | " + " | ".join(f"N={n:,} s" for n in sizes) + " | growth vs linear |")
    print("|---|" + "---|" * (len(sizes) + 1))
    rows = []
    for name, fn in operations().items():
        if "legacy" in name:  # np.isin over object arrays compares every pair: 37.6 s at 100k (issue 15)
            times = [best(lambda n=n: fn(data[n][: min(n, 30000)]), 1) for n in sizes]
            name += " (at min(N, 30k))"
            growth = (times[-1] / times[0]) / (min(sizes[-1], 30000) / min(sizes[0], 30000))
            rows.append({"operation": name, "seconds": dict(zip(sizes, times)), "growth": growth})
            print(f"| {name} | " + " | ".join(f"{t:.4f}" for t in times) + f" | {growth:.2f} |", flush=True)
            continue
        times = [best(lambda n=n: fn(data[n]), 3) for n in sizes]
        growth = (times[-1] / times[0]) / (sizes[-1] / sizes[0])
        rows.append({"operation": name, "seconds": dict(zip(sizes, times)), "growth": growth})
        print(f"| {name} | " + " | ".join(f"{t:.4f}" for t in times) + f" | {growth:.2f} |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        counts = [0, 1000, 100000]
        legacy = [failed_list_open(k, Path(tmp), legacy=True) for k in counts]
        times = [failed_list_open(k, Path(tmp)) for k in counts]
        print("\n| open_root with k failed images | " + " | ".join(f"k={k:,}" for k in counts) + " |")
        print("|---|" + "---|" * len(counts))
        print("| listed in the root attrs (before), s | " + " | ".join(f"{t:.4f}" for t in legacy) + " |")
        print("| in the failed_images group (now), s | " + " | ".join(f"{t:.4f}" for t in times) + " |")
        rows.append({"operation": "open_root, failed images in attrs", "seconds": dict(zip(counts, legacy))})
        rows.append({"operation": "open_root, failed_images group", "seconds": dict(zip(counts, times))})
    if args.store is not None and args.store.exists():
        print("\n| operation | n | seconds |\n|---|---|---|")
        for row in alignment_rows(args.store) + pool_read_rows(args.store):
            rows.append(row)
            print(f"| {row['operation']} | {row['n']:,} | {row['seconds']:.4f} |")
    print(json.dumps(rows, default=str))


if __name__ == "__main__":
    main()
