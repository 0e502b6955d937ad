"""Extraction throughput vs a bare forward of the same model over the same batches.

Both sides see identical (x_t, t, label) batches of the same size. "bare" is the
model's full forward and nothing else. "extract" is the whole extract pipeline
minus model/dataset loading: decode + preprocess, per-sample noise, hooks, the
truncated forward, float16 cast + inf/NaN check, host copy, and the background
writer compressing shards into a Zarr store. Ratio = bare time / extract time
(> 1 is possible: the truncated forward skips the rest of the network).
"extract, no fsync" is the same pipeline with the unit durability step
(``pipeline.store.durable.sync_unit``: fsync of a unit's shards and folders before
its ``done`` cells, then of ``done``) replaced by a no-op, so the fsync cost is
their ratio, measured in the same run. The store goes under ``--dir`` (default: the
system temp folder; give a folder on the file system the stores will live on).

    .venv/bin/python benchmarks/extract_throughput.py [--images 512] [--repeats 3] [--dir PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import store  # noqa: E402
from pipeline.store import durable  # noqa: E402
from pipeline.datasets.torch_data import load_images  # noqa: E402
from pipeline.datasets import DatasetConfig  # noqa: E402
from pipeline.models import Condition, ModelConfig  # noqa: E402
from stages.extract import ExtractConfig, Extractor, extract_units  # noqa: E402

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
    args = ap.parse_args()
    torch.set_num_threads(2)
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

    def bare() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for xb, t, cond in batches:
                a.forward(xb, t, cond)
        return time.perf_counter() - start

    def extract(sync: bool = True) -> float:
        out = work / "bench.zarr"
        shutil.rmtree(out, ignore_errors=True)
        store.create_store(out, ex.layout, ex.samples, ex.reader.class_names, {"stage_hash": "bench"})
        real = durable.sync_unit

        def timed(*args):
            begin = time.perf_counter()
            real(*args)
            sync_seconds.append(time.perf_counter() - begin)

        durable.sync_unit = timed if sync else (lambda *args: None)
        try:
            start = time.perf_counter()
            extract_units(ex, out, list(range(ex.layout.n_units)), progress=False)
            return time.perf_counter() - start
        finally:
            durable.sync_unit = real

    sync_seconds: list[float] = []  # time inside the durability step (both of its calls per unit)
    bare(), extract(), extract(sync=False)  # warm-up
    sync_seconds.clear()
    results = []
    for _ in range(args.repeats):  # interleaved, so drift hits every side alike
        results.append((bare(), extract(), extract(sync=False)))
    tb = min(r[0] for r in results)
    te = min(r[1] for r in results)
    tn = min(r[2] for r in results)
    n = len(pairs)
    print(f"model: {sum(p.numel() for p in a.module.parameters()) / 1e6:.2f} M params, 16x16, batch {args.batch}, "
          f"{len(x0)} images x 3 timesteps = {n} sample-timesteps, blocks {args.blocks}")
    print(f"bare forward : {n / tb:8.1f} sample-timesteps/s ({tb:.2f} s, best of {args.repeats})")
    print(f"extract      : {n / te:8.1f} sample-timesteps/s ({te:.2f} s, best of {args.repeats})")
    print(f"extract, no fsync: {n / tn:8.1f} sample-timesteps/s ({tn:.2f} s, best of {args.repeats})")
    print(f"ratio extract/bare throughput: {tb / te:.2f}")
    print(f"ratio extract with fsync / without (throughput): {tn / te:.3f} "
          f"({ex.layout.n_units} units of {ex.layout.unit_samples}, {len(ex.blocks)} blocks, under {work})")
    per_run = sum(sync_seconds) / args.repeats
    print(f"fsync time: {per_run * 1000:.1f} ms per extract run ({per_run / ex.layout.n_units * 1000:.1f} ms "
          f"per unit) = {per_run / te:.2%} of the best extract time")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
