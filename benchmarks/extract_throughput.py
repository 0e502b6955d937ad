"""Extraction throughput vs a bare forward of the same model over the same batches.

Both sides see identical (x_t, t, label) batches of the same size. "bare" is the
model's full forward and nothing else, at a given number of torch threads. "extract"
is the whole extract pipeline minus model/dataset loading: decode + preprocess,
per-sample noise, hooks, the truncated forward, float16 cast + inf/NaN check, host
copy, and the background writer compressing shards into a Zarr store. Ratio = bare
time / extract time (> 1 is possible: the truncated forward skips the rest of the
network). Extract runs at several CPU settings, interleaved in one run:

- *old defaults*: two torch threads (torch's default on 2 cores), images decoded on
  the forward's thread before each unit (``decode_threads: 0``);
- *new defaults*: ``ExtractConfig.cpu_settings`` from the cores available (all but
  one for the forward, the next unit decoded in a thread meanwhile);
- the new thread count with one DataLoader worker process decoding instead
  (``num_workers: 1``);
- the new defaults with the unit durability step (``pipeline.store.durable.sync_unit``:
  fsync of a unit's shards and folders before its ``done`` cells, then of ``done``)
  replaced by a no-op, so the fsync cost is their ratio.

The writer's throughput (raw MB a second inside ``store.write_unit``: compress +
write + fsync) is printed too. The store goes under ``--dir`` (default: the system
temp folder; give a folder on the file system the stores will live on).

    .venv/bin/python benchmarks/extract_throughput.py [--images 512] [--repeats 3] [--dir PATH] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import store  # noqa: E402
from pipeline.store import durable  # noqa: E402
from pipeline.datasets.torch_data import load_images  # noqa: E402
from pipeline.datasets import DatasetConfig  # noqa: E402
from pipeline.models import Condition, ModelConfig  # noqa: E402
from stages.extract import ExtractConfig, Extractor, available_cores, extract_units  # noqa: E402

TINY = {
    "sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [32, 64, 64],
    "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
    "num_class_embeds": 11, "attention_head_dim": 16,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--blocks", default="down_blocks.1,mid_block,up_blocks.1")
    ap.add_argument("--dir", default=None, help="Where the benchmark store is written.")
    ap.add_argument("--json", action="store_true", help="print one JSON line of the results last")
    ap.add_argument("--only-new", action="store_true", help="only the new defaults (the writer's MB/s)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dp-bench-", dir=args.dir))
    (work / "tiny.json").write_text(json.dumps(TINY))
    cfg = ExtractConfig(
        model=ModelConfig(config=str(work / "tiny.json"), null_class=10),
        dataset=DatasetConfig(reader="digits", split="all", limit=args.images),
        blocks=tuple(args.blocks.split(",")), timesteps=(10, 100, 400), batch_size=args.batch,
        conditioning="class", unit_samples=128,
    )
    ex = Extractor(cfg)
    a = ex.adapter
    cores = available_cores()
    new_threads, new_decode = cfg.cpu_settings("cpu")
    variants = {  # name: (config, fsync)
        "old defaults (2 torch threads, decode on the forward's thread)":
            (replace(cfg, torch_threads=2, decode_threads=0), True),
        f"new defaults ({new_threads} torch thread(s), {new_decode} decode thread(s))": (cfg, True),
        f"{new_threads} torch thread(s), 1 DataLoader worker": (replace(cfg, num_workers=1), True),
        "new defaults, no fsync": (cfg, False),
    }
    if args.only_new:
        variants = {k: v for k, v in variants.items() if k.startswith("new defaults")}
    # The same batches for the bare forward: all (sample, timestep) pairs, batch by batch.
    arrays, _ = load_images(ex.reader, ex.prep, range(len(ex.reader.records)))
    x0 = torch.stack([torch.from_numpy(arrays[i]) for i in range(len(arrays))])
    pairs = [(s, ti) for s in range(len(x0)) for ti in range(3)]
    batches = []
    for b in range(0, len(pairs), args.batch):
        chunk = pairs[b : b + args.batch]
        t = torch.tensor([cfg.timesteps[ti] for _, ti in chunk])
        xb = a.add_noise(x0[[s for s, _ in chunk]], torch.randn(len(chunk), *x0.shape[1:]), t)
        labels = torch.tensor([ex.samples.label[s] for s, _ in chunk])
        batches.append((xb, t, Condition("class", labels=labels)))

    def bare(threads: int) -> float:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        with torch.no_grad():
            for xb, t, cond in batches:
                a.forward(xb, t, cond)
        return time.perf_counter() - start

    write_seconds: list[float] = []  # time inside store.write_unit (compress, write, fsync, done)
    real_write = store.write_unit

    def timed_write(*args):
        begin = time.perf_counter()
        real_write(*args)
        write_seconds.append(time.perf_counter() - begin)

    def extract(variant_cfg: ExtractConfig, sync: bool = True) -> float:
        out = work / "bench.zarr"
        shutil.rmtree(out, ignore_errors=True)
        store.create_store(out, ex.layout, ex.samples, ex.reader.class_names, {"stage_hash": "bench"})
        real = durable.sync_unit

        def timed(*args):
            begin = time.perf_counter()
            real(*args)
            sync_seconds.append(time.perf_counter() - begin)

        durable.sync_unit = timed if sync else (lambda *args: None)
        store.write_unit = timed_write
        ex.cfg = variant_cfg
        try:
            start = time.perf_counter()
            extract_units(ex, out, list(range(ex.layout.n_units)), progress=False)
            return time.perf_counter() - start
        finally:
            durable.sync_unit = real
            store.write_unit = real_write
            ex.cfg = cfg

    sync_seconds: list[float] = []  # time inside the durability step (both of its calls per unit)
    thread_counts = sorted({new_threads} if args.only_new else {2, new_threads})
    for threads in thread_counts:  # warm-up
        bare(threads)
    for variant_cfg, sync in variants.values():
        extract(variant_cfg, sync)
    sync_seconds.clear()
    write_seconds.clear()
    bare_s = {n: [] for n in thread_counts}
    extract_s = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so drift hits every side alike
        for threads in thread_counts:
            bare_s[threads].append(bare(threads))
        for name, (variant_cfg, sync) in variants.items():
            extract_s[name].append(extract(variant_cfg, sync))
    n = len(pairs)
    best_bare = {k: min(v) for k, v in bare_s.items()}
    fastest_bare = min(best_bare.values())
    print(f"model: {sum(p.numel() for p in a.module.parameters()) / 1e6:.2f} M params, 16x16, batch {args.batch}, "
          f"{len(x0)} images x 3 timesteps = {n} sample-timesteps, blocks {args.blocks}; {cores} cores available; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| run | sample-timesteps/s | / bare at its threads | / fastest bare |")
    print("|---|---|---|---|")
    for threads, seconds in best_bare.items():
        print(f"| bare forward, {threads} torch thread(s) | {n / seconds:.1f} | — | {fastest_bare / seconds:.2f} |")
    results = {"cores": cores, "sample_timesteps": n, "bare": {}, "extract": {}}
    for threads, seconds in best_bare.items():
        results["bare"][threads] = n / seconds
    for name, times in extract_s.items():
        te = min(times)
        threads = variants[name][0].cpu_settings("cpu")[0]
        same = best_bare.get(threads)
        same_text = f"**{same / te:.2f}**" if same else "—"
        print(f"| extract, {name} | {n / te:.1f} | {same_text} | {fastest_bare / te:.2f} |")
        results["extract"][name] = {"per_s": n / te, "vs_bare_same_threads": same / te if same else None,
                                    "vs_fastest_bare": fastest_bare / te}
    units_run = args.repeats * len(variants) * ex.layout.n_units
    write_mb = ex.layout.bytes_per_sample() * ex.layout.unit_samples / 1e6
    per_unit = sum(write_seconds) / max(1, units_run)
    print(f"writer: {per_unit * 1000:.1f} ms per unit of {write_mb:.2f} MB raw = {write_mb / per_unit:.1f} MB/s "
          f"(compress + write + fsync + done, {units_run} units)")
    sync_runs = args.repeats * sum(1 for _, sync in variants.values() if sync)
    per_run = sum(sync_seconds) / max(1, sync_runs)
    with_sync = min(extract_s[next(k for k in variants if k.startswith("new defaults ("))])
    without = min(extract_s["new defaults, no fsync"])
    print(f"ratio extract with fsync / without (throughput): {without / with_sync:.3f}; fsync time "
          f"{per_run * 1000:.1f} ms per extract run ({per_run / ex.layout.n_units * 1000:.1f} ms per unit)")
    results["writer_mb_per_s"] = write_mb / per_unit
    if args.json:
        print(json.dumps(results))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
