"""Extraction throughput vs a bare forward of the same model over the same batches.

Both sides see identical (x_t, t, label) batches of the same size. "bare" is the
model's full forward and nothing else. "extract" is the whole extract pipeline
minus model/dataset loading: decode + preprocess, per-sample noise, hooks, the
truncated forward, float16 cast + inf/NaN check, host copy, and the background
writer compressing shards into a Zarr store. Ratio = bare time / extract time
(> 1 is possible: the truncated forward skips the rest of the network).

    .venv/bin/python benchmarks/extract_throughput.py [--images 512] [--repeats 3]
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
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="dp-bench-"))
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

    def extract() -> float:
        out = work / "bench.zarr"
        shutil.rmtree(out, ignore_errors=True)
        store.create_store(out, ex.layout, ex.samples, ex.reader.class_names, {"stage_hash": "bench"})
        start = time.perf_counter()
        extract_units(ex, out, list(range(ex.layout.n_units)), progress=False)
        return time.perf_counter() - start

    bare(), extract()  # warm-up
    results = []
    for _ in range(args.repeats):  # interleaved, so drift hits both sides alike
        tb, te = bare(), extract()
        results.append((tb, te))
    tb = min(r[0] for r in results)
    te = min(r[1] for r in results)
    n = len(pairs)
    print(f"model: {sum(p.numel() for p in a.module.parameters()) / 1e6:.2f} M params, 16x16, batch {args.batch}, "
          f"{len(x0)} images x 3 timesteps = {n} sample-timesteps, blocks {args.blocks}")
    print(f"bare forward : {n / tb:8.1f} sample-timesteps/s ({tb:.2f} s, best of {args.repeats})")
    print(f"extract      : {n / te:8.1f} sample-timesteps/s ({te:.2f} s, best of {args.repeats})")
    print(f"ratio extract/bare throughput: {tb / te:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
