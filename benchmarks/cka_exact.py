"""Exact linear CKA, streamed over column chunks of two float16 Zarr arrays on disk.

Default size: n = 10,000 samples x d = 65,536 features per representation (1.31 GB
per array in float16). X has a shared low-rank part plus noise; Y is a noisy linear
image of X's latent factors, so the CKA is neither 0 nor 1. Entries are ~N(0, 1.5^2),
so squared row norms (~147k) exceed float16's 65504: a float16 Gram would overflow.

Each phase runs in its own process so its peak RSS is its own:

    write   generate column blocks and write them (nothing full-size in RAM)
    cka     LinearCKAAccumulator, Gram route: read X[:, j:j+c] and Y[:, j:j+c],
            upcast to float64, centre, rank-c update of an (n, n) float64 Gram

Memory bound of the cka phase: two (n, n) float64 Grams (2 x 8 n^2 bytes = 1.6 GB
at n = 10,000) plus one column chunk in float16 and float64 (10 n c bytes).

    .venv/bin/python benchmarks/cka_exact.py                 # full size, deletes its data
    .venv/bin/python benchmarks/cka_exact.py --n 2000 --d 8192   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def write_phase(a) -> dict:
    import zarr

    rng = np.random.default_rng(a.seed)
    rank = 64
    zx_latent = rng.standard_normal((a.n, rank), dtype=np.float32)
    zy_latent = (zx_latent @ rng.standard_normal((rank, rank), dtype=np.float32) / np.sqrt(rank)
                 + 0.5 * rng.standard_normal((a.n, rank), dtype=np.float32))
    arrays = {}
    for name in ("x", "y"):
        arrays[name] = zarr.create_array(store=str(Path(a.dir) / f"{name}.zarr"), shape=(a.n, a.d),
                                         chunks=(a.chunk_rows, a.chunk_cols), dtype="float16")
    t0 = time.perf_counter()
    for j in range(0, a.d, a.chunk_cols):
        c = min(a.chunk_cols, a.d - j)
        for name, latent in (("x", zx_latent), ("y", zy_latent)):
            block = latent @ rng.standard_normal((rank, c), dtype=np.float32) / np.sqrt(rank)
            block += rng.standard_normal((a.n, c), dtype=np.float32)
            block += 3.0 * rng.standard_normal(c, dtype=np.float32)  # per-feature means to centre away
            arrays[name][:, j:j + c] = block.astype(np.float16)
    return {"write_s": time.perf_counter() - t0, "write_peak_rss_bytes": peak_rss_bytes(),
            "bytes_on_disk": sum(f.stat().st_size for f in Path(a.dir).rglob("*") if f.is_file())}


def cka_phase(a) -> dict:
    import zarr

    from pipeline.cka.estimators import LinearCKAAccumulator

    zx = zarr.open_array(str(Path(a.dir) / "x.zarr"), mode="r")
    zy = zarr.open_array(str(Path(a.dir) / "y.zarr"), mode="r")
    n, d = zx.shape
    baseline = current_rss_bytes()  # interpreter + numpy + scipy + zarr, before any data
    t0 = time.perf_counter()
    acc = LinearCKAAccumulator(n, d, zy.shape[1], route="gram")
    read_s = update_s = 0.0
    for name, z, add in (("X", zx, acc.add_x_columns), ("Y", zy, acc.add_y_columns)):
        for k, j in enumerate(range(0, d, a.chunk_cols)):
            t = time.perf_counter()
            block = z[:, j:j + a.chunk_cols]
            read_s += time.perf_counter() - t
            t = time.perf_counter()
            add(block)
            update_s += time.perf_counter() - t
            if k % 16 == 15:
                print(f"  {name}: {j + a.chunk_cols}/{d} columns, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
    t = time.perf_counter()
    value = acc.result()
    finalize_s = time.perf_counter() - t
    return {"cka": value, "cka_s": time.perf_counter() - t0, "read_s": read_s, "gram_update_s": update_s,
            "finalize_s": finalize_s, "cka_peak_rss_bytes": peak_rss_bytes(),
            "baseline_rss_bytes": baseline,
            "bound_grams_bytes": acc.bytes_held, "bound_chunk_bytes": 10 * n * a.chunk_cols}


def run_child(phase: str, a) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--n", str(a.n), "--d", str(a.d),
           "--chunk-rows", str(a.chunk_rows), "--chunk-cols", str(a.chunk_cols),
           "--seed", str(a.seed), "--dir", a.dir]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--d", type=int, default=65_536)
    p.add_argument("--chunk-rows", type=int, default=2_500)
    p.add_argument("--chunk-cols", type=int, default=1_024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="where the two Zarr arrays go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the arrays afterwards")
    p.add_argument("--phase", choices=["all", "write", "cka"], default="all")
    a = p.parse_args()
    if a.phase != "all":
        print(json.dumps((write_phase if a.phase == "write" else cka_phase)(a)))
        return

    own_dir = a.dir is None
    a.dir = a.dir or tempfile.mkdtemp(prefix="cka_exact_", dir="/tmp")
    try:
        res = {"n": a.n, "d": a.d, "chunks": [a.chunk_rows, a.chunk_cols], "cpus": os.cpu_count()}
        print(f"writing 2 x ({a.n}, {a.d}) float16 to {a.dir}", file=sys.stderr, flush=True)
        res.update(run_child("write", a))
        print("exact linear CKA, Gram route", file=sys.stderr, flush=True)
        res.update(run_child("cka", a))
    finally:
        if own_dir and not a.keep:
            shutil.rmtree(a.dir, ignore_errors=True)
    gib = 2**30
    macs = 2 * a.n * a.n * a.d / 2  # syrk: half of n^2 d multiply-adds per representation
    print(json.dumps(res, indent=1))
    print(f"CKA = {res['cka']:.6f}; exact streaming {res['cka_s']:.1f} s "
          f"(read {res['read_s']:.1f} s, Gram updates {res['gram_update_s']:.1f} s "
          f"= {2 * macs / res['gram_update_s'] / 1e9:.1f} GFLOP/s, finalize {res['finalize_s']:.1f} s); "
          f"peak RSS {res['cka_peak_rss_bytes'] / gib:.2f} GiB vs bound "
          f"{(res['bound_grams_bytes'] + res['bound_chunk_bytes']) / gib:.2f} GiB "
          f"(Grams {res['bound_grams_bytes'] / gib:.2f} + chunk {res['bound_chunk_bytes'] / gib:.2f}) "
          f"+ baseline {res['baseline_rss_bytes'] / gib:.2f} GiB; "
          f"write {res['write_s']:.1f} s, {res['bytes_on_disk'] / gib:.2f} GiB on disk")


if __name__ == "__main__":
    main()
