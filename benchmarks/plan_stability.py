"""How stable ``diffprobe plan``'s time estimates are, and the ImageNet moonshot projected from them.

    .venv/bin/python benchmarks/plan_stability.py --repeats 3 [--moonshot] [--out /tmp/dp-plan]

Stability: the demo's two identical architectures (the shipped digits model ``trained``
and its random-init twin ``random``, 3 blocks x 5 timesteps, batch 128) are planned
``--repeats`` times each, interleaved, in this process, with every measured sample
forgotten between plans (so each plan measures again). For each estimate the table
gives every value, the spread (largest / smallest over all plans of both
architectures) and the ratio between the two architectures' medians (1.0 = the plan
cannot tell two identical architectures apart, as it should not). The extract row is
also measured the way plan did before (one cold timed batch, no warm-up, a fresh
model each time) as ``extract, one cold batch``.

Moonshot (``--moonshot``): ImageNet train (1,281,167 images) x 5 timesteps x 3 blocks
pooled 2x2 with an ADM-256-sized model (a diffusers ``UNet2DModel`` with guided-diffusion
ADM-256's widths, ``benchmarks/gpu/models.py``; random weights: the same FLOPs as the
released checkpoint) on one H100. Planned here as on a login node (``device: cuda`` on a
machine without one): the forward's FLOPs per sample-timestep are counted on the meta
device, one forward is timed on the CPU, and the totals (forward passes, bytes, GPU
hours at 25 / 40 / 60 % of the H100's dense fp16 peak) are scaled from 8 images to
1.28 M. A projection, not a measurement: ``benchmarks/gpu/run.sh`` measures the GPU.

Writes ``<out>/plan_stability.md`` and ``.json``; records ``uptime`` before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

DEMO_STAGES = """\
name: plan-stability
output_dir: out
cluster: {{kind: local, n_workers: 2, threads_per_worker: 1, memory_limit: 3GiB}}
stages:
{extracts}
  - {{name: trained_pooled, stage: pool, input: trained, sizes: [1, 4]}}
  - {{name: random_pooled, stage: pool, input: random, sizes: [1, 4]}}
{probes}
  - {{name: cka_trained, stage: cka, selections: [{{input: trained}}]}}
  - {{name: cka_random, stage: cka, selections: [{{input: random}}]}}
"""
EXTRACT = """\
  - name: {name}
    stage: extract
    model: {{path: {models}/digits-ddpm, null_class: 10{extra}}}
    dataset: {{reader: digits, split: all}}
    blocks: [down_blocks.1, mid_block, up_blocks.0]
    timesteps: [10, 50, 100, 200, 400]
    conditioning: null
    batch_size: 128
"""
PROBE = """\
  - name: {name}_probe
    stage: probe
    input: {name}_pooled
    heads:
      - {{name: linear, head: {{kind: linear}}, train: {{optimizer: sgd, lr: 0.05, schedule: step, step_size: 4}}}}
      - {{name: mlp, head: {{kind: mlp, hidden: 256}}}}
      - {{name: cnn, head: {{kind: cnn, hidden: 64, depth: 2}}, pools: [4]}}
      - {{name: attention, head: {{kind: attention, width: 64, heads: 4, depth: 1}}, pools: [4]}}
    train: {{optimizer: adamw, lr: 0.001, weight_decay: 0.0001, schedule: cosine, epochs: 10}}
"""

IMAGENET_TRAIN = 1_281_167
MOON_TIMESTEPS = [50, 90, 150, 200, 300]
# ADM paper blocks 19 (middle), 24 (output_blocks.4) and 30 (output_blocks.10) in diffusers names
MOON_BLOCKS = ["mid_block", "up_blocks.1.attentions.1", "up_blocks.3.resnets.1"]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def forget_samples() -> None:
    """Drop every measured sample kept in this process, so the next plan measures again."""
    from pipeline.cka import estimate as cka_estimate
    from pipeline.probing import estimate as probe_estimate

    cka_estimate._SAMPLES.clear()
    probe_estimate._SAMPLES.clear()


def runner_for(path: Path):
    from pipeline.workflow.config import load_workflow
    from pipeline.workflow.runner import Runner
    from stages import STAGES

    return Runner(load_workflow(path, STAGES), progress=False)


def sample_timesteps_per_s(rows) -> float:
    value = dict(rows)["time (est.)"]
    return float(value.split(" at ")[1].split(" sample-timesteps/s")[0])


def cold_batch_rate(cfg) -> float:
    """What plan measured before: one timed batch on a freshly built model, no warm-up."""
    from stages.extract import Extractor
    from pipeline import store

    ex = Extractor(cfg)
    n_t = len(ex.timesteps)
    m = min(ex.layout.n_samples, max(1, cfg.batch_size // n_t))
    ex.layout = store.make_layout(m, ex.block_shapes, ex.timesteps, cfg.dtype, unit_samples=m)
    start = time.perf_counter()
    ex.compute_unit(0)
    return m * n_t / (time.perf_counter() - start)


def demo_workflow(work: Path) -> Path:
    models = ROOT / "data" / "models"
    extracts = EXTRACT.format(name="trained", models=models, extra="") + \
        EXTRACT.format(name="random", models=models, extra=", random_init: true, seed: 0")
    probes = PROBE.format(name="trained") + PROBE.format(name="random")
    path = work / "stability.yaml"
    path.write_text(DEMO_STAGES.format(extracts=extracts.rstrip("\n"), probes=probes.rstrip("\n")))
    return path


def stability(work: Path, repeats: int) -> dict:
    from pipeline.estimate import total_seconds

    runner = runner_for(demo_workflow(work))
    values: dict[str, dict[str, list[float]]] = {}

    def record(quantity, arch, value):
        values.setdefault(quantity, {}).setdefault(arch, []).append(value)

    for r in range(repeats):
        for arch in ("trained", "random"):
            forget_samples()
            for name, quantity in [(arch, "extract (sample-timesteps/s)"), (f"{arch}_pooled", "pool (s)"),
                                   (f"{arch}_probe", "probe (s)"), (f"cka_{arch}", "cka (s)")]:
                entry = runner.wf.stage(name)
                stage, ctx = runner.stages[name], runner.context(entry)
                if entry.kind == "extract":
                    record(quantity, arch, sample_timesteps_per_s(stage.plan(entry.config, ctx)))
                    record("extract, one cold batch (sample-timesteps/s)", arch, cold_batch_rate(entry.config))
                else:
                    record(quantity, arch, total_seconds(stage.estimate(entry.config, ctx)))
            print(f"repeat {r + 1}/{repeats} {arch}: " + ", ".join(
                f"{q} {v[arch][-1]:.4g}" for q, v in values.items()), flush=True)
    table = {}
    for quantity, by_arch in values.items():
        every = by_arch["trained"] + by_arch["random"]
        table[quantity] = {
            "trained": by_arch["trained"], "random": by_arch["random"],
            "spread": max(every) / min(every),
            "arch_ratio": statistics.median(by_arch["trained"]) / statistics.median(by_arch["random"]),
        }
    return table


def validate(work: Path) -> dict:
    """Estimate against the real work, both in CPU seconds on one thread: extract ``trained``
    (in this process), then pool every unit, train one probe group (mid_block at pool 4,
    all four heads) and compute the CKA matrix in this process, each timed by
    ``time.process_time`` (what it costs on a core of its own, whatever the load)."""
    from pipeline import store
    from pipeline.estimate import torch_threads, total_seconds
    from pipeline.probing.estimate import probe_estimates
    from stages.cka import build_cka_work, cka_tile
    from stages.pool import pool_unit
    from stages.probe import build_grid, train_group

    runner = runner_for(demo_workflow(work))
    runner.run(only="trained")
    out = {}
    with torch_threads(1):
        entry = runner.wf.stage("trained_pooled")
        stage, ctx = runner.stages["trained_pooled"], runner.context(entry)
        forget_samples()
        estimate = total_seconds(stage.estimate(entry.config, ctx)) * 2  # undo the 2 workers
        start = time.process_time()
        for task in stage.prepare(entry.config, ctx):
            pool_unit(task)
        out["pool (all units)"] = (estimate, time.process_time() - start)
        store.finalize(ctx.output)

        entry = runner.wf.stage("trained_probe")
        stage, ctx = runner.stages["trained_probe"], runner.context(entry)
        grid = build_grid(entry.config, ctx.inputs["input"], None)
        task = next(t for t in grid.tasks if t.block == "mid_block" and t.pool == 4)
        groups, sizes, classes = stage._written_groups(entry.config, grid, ctx.inputs["input"], None)
        group = [g for g in groups if g.block == "mid_block" and g.pool == 4]
        forget_samples()
        estimate = total_seconds(probe_estimates(group, sizes, classes, entry.config.batch_size,
                                                 entry.config.eval_batch_size, 1, 1))
        start = time.process_time()
        rows = train_group(task)
        out["probe (mid_block/p4, 4 heads x 5 timesteps)"] = (estimate, time.process_time() - start)
        out["probe epochs run / configured"] = (sum(r["epochs_run"] for r in rows),
                                                sum(10 for _ in rows))

        entry = runner.wf.stage("cka_trained")
        stage, ctx = runner.stages["cka_trained"], runner.context(entry)
        forget_samples()
        estimate = total_seconds(stage.estimate(entry.config, ctx))
        plan = build_cka_work(entry.config, stage._paths(entry.config, ctx), runner.wf.cluster)
        start = time.process_time()
        for phase in plan.phases:
            for task in phase:
                cka_tile(task)
        out["cka (15 x 15 within)"] = (estimate, time.process_time() - start)
    return out


def moonshot(work: Path) -> dict:
    import models as gpu_models

    from pipeline.estimate import ASSUMED_GPU_UTILISATION, H100_FP16_DENSE_FLOPS

    (work / "adm256.json").write_text(json.dumps(gpu_models.adm_config(False)))
    gpu_models.write_image_folder(work / "images", 8, 256, classes=["a", "b"])
    path = work / "moonshot.yaml"
    path.write_text(f"""\
name: moonshot
output_dir: out
stages:
  - name: train_features
    stage: extract
    model: {{config: adm256.json}}
    dataset: {{reader: imagefolder, root: images, resize: adm}}
    blocks: {json.dumps(MOON_BLOCKS)}
    timesteps: {json.dumps(MOON_TIMESTEPS)}
    pool: {{size: 2, mode: avg}}
    batch_size: 64
    device: cuda
    compute_dtype: float16
    dtype: float16
""")
    runner = runner_for(path)
    entry = runner.wf.stage("train_features")
    stage = runner.stages["train_features"]
    start = time.perf_counter()
    rows = dict(stage.plan(entry.config, runner.context(entry)))
    plan_s = time.perf_counter() - start
    from stages.extract import Extractor

    ex = Extractor(entry.config, device="cpu")
    flops = ex.adapter.forward_flops(ex.blocks[-1].name)
    full_flops = ex.adapter.forward_flops(ex.adapter.blocks()[-1].name)
    pairs = IMAGENET_TRAIN * len(MOON_TIMESTEPS)
    passes = math.ceil(pairs / entry.config.batch_size)
    raw = IMAGENET_TRAIN * ex.layout.bytes_per_sample()
    cpu_s = float(rows["time (est.)"].split(" at ")[1].split(" sample-timesteps/s")[0])
    hours = {u: flops * pairs / (H100_FP16_DENSE_FLOPS * u) / 3600 for u in (0.25, ASSUMED_GPU_UTILISATION, 0.6)}
    return {
        "plan_rows": rows, "plan_seconds": plan_s, "blocks": {b: list(s) for b, s in ex.block_shapes.items()},
        "flops_per_sample_timestep": flops, "flops_full_forward": full_flops,
        "cpu_sample_timesteps_per_s": cpu_s, "cpu_achieved_gflops": flops * cpu_s / 1e9,
        "sample_timesteps": pairs, "forward_passes_batch64": passes, "bytes_raw": raw,
        "gpu_hours": hours, "cpu_hours": pairs / cpu_s / 3600,
    }


def markdown(result: dict) -> str:
    lines = [f"uptime before: `{result['uptime_before']}`", f"uptime after: `{result['uptime_after']}`", ""]
    if "stability" in result:
        lines += ["| estimate | trained (each plan) | random (each plan) | spread (max/min, all plans) | "
                  "trained / random (medians) |", "|---|---|---|---|---|"]
        for q, row in result["stability"].items():
            fmt = lambda vs: ", ".join(f"{v:.3g}" for v in vs)  # noqa: E731
            lines.append(f"| {q} | {fmt(row['trained'])} | {fmt(row['random'])} | {row['spread']:.2f}x | "
                         f"{row['arch_ratio']:.2f} |")
        lines.append("")
    if "validate" in result:
        lines += ["| piece | estimate (CPU s) | measured (CPU s) | measured / estimate |", "|---|---|---|---|"]
        for q, (est, real) in result["validate"].items():
            lines.append(f"| {q} | {est:.3g} | {real:.3g} | {real / est:.2f} |")
        lines.append("")
    if "moonshot" in result:
        m = result["moonshot"]
        lines += [
            f"- blocks stored: {m['blocks']}",
            f"- FLOPs per sample-timestep (truncated after the last block, counted on meta): "
            f"{m['flops_per_sample_timestep'] / 1e9:,.0f} GFLOP (full forward {m['flops_full_forward'] / 1e9:,.0f})",
            f"- CPU here: {m['cpu_sample_timesteps_per_s']:.3f} sample-timesteps/s "
            f"({m['cpu_achieved_gflops']:.0f} GFLOP/s achieved), i.e. {m['cpu_hours']:,.0f} CPU-hours for the run",
            f"- sample-timesteps: {m['sample_timesteps']:,}; forward passes at batch 64: {m['forward_passes_batch64']:,}",
            f"- bytes raw (float16): {m['bytes_raw'] / 2**30:.2f} GiB",
            "- GPU hours on one H100: " + ", ".join(f"{h:.2f} h at {u:.0%}" for u, h in m["gpu_hours"].items()),
            f"- plan of this stage took {m['plan_seconds']:.0f} s here",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--moonshot", action="store_true", help="also project the ImageNet ADM-256 run")
    parser.add_argument("--no-stability", action="store_true")
    parser.add_argument("--validate", action="store_true",
                        help="also run pool, one probe group and cka for real and compare with the estimates")
    parser.add_argument("--out", type=Path, default=Path("/tmp/dp-plan-stability"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"uptime_before": uptime()}
    if not args.no_stability:
        result["stability"] = stability(args.out, args.repeats)
    if args.validate:
        result["validate"] = validate(args.out)
    if args.moonshot:
        result["moonshot"] = moonshot(args.out)
    result["uptime_after"] = uptime()
    (args.out / "plan_stability.json").write_text(json.dumps(result, indent=1, default=str))
    text = markdown(result)
    (args.out / "plan_stability.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
