"""Why the probe's window reader is a process: zarr reads in a thread slow training beside them.

Times the same in-memory ``train_heads`` call (one linear head, 8 epochs, torch on
one thread) alone, beside a thread that keeps reading the store's slabs through
zarr, and beside a process doing the same reads. The reads go nowhere; only the
training's wall time is measured, interleaved, best of ``--repeats``. Also times
the reads alone: one pass over every slab, MiB of decoded float16 a second.

    .venv/bin/python benchmarks/reader_contention.py [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline import store  # noqa: E402

ARRAY = "blocks/b/p/activations"


def keep_reading(path: str, stop) -> None:
    from pipeline.store.source import ZarrSource

    source = ZarrSource([(path, ARRAY)], [100])
    while not stop.is_set():
        for slab in range(len(source.slab_start)):
            source._read_slabs(slab, slab, ["t100"])
            if stop.is_set():
                return


def main() -> None:
    import torch
    from probe_throughput import RAW, write_store

    from pipeline.probing.heads import HeadSpec
    from pipeline.probing.training import ArraySource, HeadJob, TrainSpec, train_heads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON line of the results last")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "s.zarr")
        write_store(Path(path), args.n, 512, 4, RAW)
        labels = store.open_root(path)["label"][:]
        perm = np.random.default_rng(1).permutation(args.n)
        train_idx, test_idx = np.sort(perm[args.n // 5:]), np.sort(perm[:args.n // 5])
        jobs = [HeadJob(HeadSpec("linear"), TrainSpec("adamw", lr=1e-3, epochs=8), key="t100")]
        kwargs = dict(batch_size=256, val_fraction=0.1, seed=0, num_classes=10)
        memory = ArraySource({"t100": store.open_root(path)[ARRAY][:, 0]}, labels)
        train_heads(memory, train_idx[:512], test_idx[:128], jobs, **kwargs)  # warm up

        def timed() -> float:
            start = time.perf_counter()
            train_heads(memory, train_idx, test_idx, jobs, **kwargs)
            return time.perf_counter() - start

        fork = multiprocessing.get_context("fork")
        best = {"alone": [], "beside a zarr-reading thread": [], "beside a zarr-reading process": []}
        for _ in range(args.repeats):
            best["alone"].append(timed())
            for name, make, event in (("beside a zarr-reading thread", threading.Thread, threading.Event),
                                      ("beside a zarr-reading process", fork.Process, fork.Event)):
                stop = event()
                reader = make(target=keep_reading, args=(path, stop), daemon=True)
                reader.start()
                time.sleep(0.5)
                best[name].append(timed())
                stop.set()
                reader.join()
        from pipeline.store.source import ZarrSource

        source = ZarrSource([(path, ARRAY)], [100])
        pass_s = []
        for _ in range(args.repeats + 1):  # the first pass warms the page cache
            start = time.perf_counter()
            for slab in range(len(source.slab_start)):
                source._read_slabs(slab, slab, ["t100"])
            pass_s.append(time.perf_counter() - start)
        read_mib_s = args.n * 512 * 4 * 4 * 2 / 2**20 / min(pass_s[1:])
        alone = min(best["alone"])
        print("| training (in memory) | best wall time s | vs alone |")
        print("|---|---|---|")
        for name, times in best.items():
            print(f"| {name} | {min(times):.2f} | {min(times) / alone:.2f}x |")
        print(f"reads alone: {read_mib_s:.0f} MiB/s (one pass over every slab, best of {args.repeats})")
        if args.json:
            print(json.dumps({"slowdown": {k: min(v) / alone for k, v in best.items()},
                              "read_mib_per_s": read_mib_s}))


if __name__ == "__main__":
    main()
