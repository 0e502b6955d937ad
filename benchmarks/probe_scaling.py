"""Probe-grid wall time on a LocalCluster of 1, 2 and 4 single-thread workers.

Builds (once, through the runner) digits features of the tiny random UNet used in
the tests: the train split (1,437 images), 3 blocks x 3 timesteps, pooled to 1, 2
and 4. The grid: 3 blocks x 3 pools = 9 read groups (dask tasks), each training
3 timesteps x 2 heads (linear, MLP) = 6 cells for ``--epochs`` epochs: 54 cells.

For each worker count the cluster is started and warmed up (torch and the stage
imported on every worker) before the clock starts, so the time is the grid's:
``run_tasks(client, train_group, tasks)``. Reported: wall time, speed-up over one
worker, and "busy" = sum of the tasks' own pass times / wall time (how many
workers were really computing at once).

    .venv/bin/python benchmarks/probe_scaling.py                  # stores under a temp dir
    .venv/bin/python benchmarks/probe_scaling.py --folder /tmp/ps # keep and reuse the stores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_UNET = {
    "sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
    "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "num_class_embeds": 11,
    "attention_head_dim": 8,
}
WORKFLOW = """\
name: probe-scaling
output_dir: out
cluster: {kind: local, n_workers: 2, dashboard: false}
stages:
  - name: ex
    stage: extract
    model: {config: tiny.json, null_class: 10}
    dataset: {reader: digits, split: train}
    blocks: [down_blocks.1, mid_block, up_blocks.0]
    timesteps: [10, 100, 400]
    conditioning: "null"
    unit_samples: 256
  - {name: pooled, stage: pool, input: ex, sizes: [1, 2, 4]}
"""


def warm(dask_worker=None):
    import torch  # noqa: F401

    import stages.probe  # noqa: F401


def build_stores(folder: Path):
    from pipeline.workflow.config import load_workflow
    from stages import STAGES
    from pipeline.workflow.runner import Runner

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.json").write_text(json.dumps(TINY_UNET))
    (folder / "wf.yaml").write_text(WORKFLOW)
    wf = load_workflow(folder / "wf.yaml", STAGES)
    Runner(wf, progress=False).run()
    return wf.stage("pooled").output


def main() -> None:
    from pipeline.cluster.client import get_client, run_tasks
    from pipeline.workflow.config import ClusterConfig
    from pipeline.probing.heads import HeadSpec
    from pipeline.probing.training import TrainSpec
    from stages.probe import ProbeConfig, ProbeHead, build_grid, train_group

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pooled = build_stores(args.folder or Path(tmp))
        cfg = ProbeConfig(
            input="pooled",
            heads=(ProbeHead("linear", HeadSpec("linear")), ProbeHead("mlp", HeadSpec("mlp", hidden=128))),
            train=TrainSpec("adamw", lr=3e-3, epochs=args.epochs),
        )
        tasks = build_grid(cfg, pooled, None).tasks
        cells = sum(len(t.timesteps) * len(t.heads) for t in tasks)
        print(f"grid: {len(tasks)} tasks, {cells} cells, {args.epochs} epochs; cpus: {os.cpu_count()}, "
              f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
        print("| workers | cluster start s | grid wall s | speed-up | busy workers | best top-1 "
              "| load avg (1 min) |")
        print("|---|---|---|---|---|---|---|")
        base = None
        for n in args.workers:
            start = time.perf_counter()
            with get_client(ClusterConfig(kind="local", n_workers=n, threads_per_worker=1, dashboard=False),
                            log=lambda _: None) as client:
                client.run(warm)
                started = time.perf_counter() - start
                t0 = time.perf_counter()
                outcomes = run_tasks(client, train_group, tasks, log=lambda _: None)
                wall = time.perf_counter() - t0
            assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
            busy = sum(o.result[0]["pass_time_s"] for o in outcomes) / wall
            best = max(r["top1"] for o in outcomes for r in o.result)
            base = base or wall
            print(f"| {n} | {started:.1f} | {wall:.1f} | {base / wall:.2f} | {busy:.2f} | {best:.3f} | "
                  f"{os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
