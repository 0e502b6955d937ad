"""The papers' way against diffprobe's: re-run the frozen U-Net every epoch, or extract once.

diffssl (arXiv 2307.08702) trains its heads with a fresh noise draw every step, so
every training epoch runs the frozen U-Net over the whole training set again.
diffprobe runs it once (extract), pools and probes from the store. Both sides here
use the same model (the shipped digits DDPM, null class), block (``mid_block``),
timestep (50), pooling (2x2 average), head (linear, 256 -> 10) and optimiser (SGD,
lr 0.05, momentum 0.9, weight decay 1e-4, step schedule with step ``max(1, E // 4)``
and gamma 0.1, batch 32), on the same train/test split of images (diffprobe's
``split_by_image``, 20 % test, seed 0; no validation split on either side):

rerun      a torch training loop (a child process, timed from its start: imports,
           model load and all; it borrows diffprobe's reader, image loading, model
           adapter and hooks, so both sides see the same pixels and the same forward):
           decode the images once and keep them in memory (favourable to it: the
           reference decodes every epoch), then per epoch a fresh ``torch.randn``
           noise draw per image, the truncated forward to the block (batch 128), 2x2
           average pooling, and head steps on batches of 32; the head is
           ``BatchNorm1d(affine=False)`` + ``Linear`` (features change every epoch,
           so it standardises on the fly); test: one forward of the test images at a
           fixed draw.
diffprobe  ``diffprobe run`` (a child process) of extract -> pool (size 2) -> probe
           (one linear head) in a fresh output folder every time, so each run
           extracts again: the cost of extract once + pool + probe, as a user meets it.
           All of it runs in that one process: extract computes there, and pool (a
           few MiB of maps for digits, ~20 MiB for synth10000: under
           ``cluster.in_process_mib``) and probe (one cell, one task) run their tasks
           in-process, so no dask cluster starts; the workflow's ``cluster: {kind:
           local, n_workers: 2}`` is what a user would write, and would be started
           once for the whole run if a stage's work were larger.

Both sides run in the same invocation, interleaved per E (rerun, diffprobe, and
``--base`` (another diffprobe checkout, e.g. the code before a change) if given), and
the table reports the ratio rerun / diffprobe per E and both test accuracies; each
side's time is also split into a fixed part and a per-epoch part (its training
time per epoch, measured inside the run: the re-run side's epochs hold its
forwards, diffprobe's only the probe's epochs), which gives the break-even E and the
ratio at E values not run (``--project``). ``--datasets`` takes ``digits`` (the 1,797 digits) and ``synthN`` (N
synthetic 16x16 PNGs in 10 class folders, ``benchmarks/scale.py``'s images; their
labels are nearly independent of the pixels, so accuracies there are near chance:
the rows measure time).

    .venv/bin/python benchmarks/rerun_vs_cache.py --datasets digits,synth10000 --epochs 1,5,28 \\
        --work /tmp/rvc [--base /path/to/other/checkout] [--base-epochs 1,5] [--project 1,2,5,28]

The defaults are the values shown, except ``--work`` (``/tmp/rerun-vs-cache``),
``--base`` (none: two sides) and ``--base-epochs`` (``--epochs``). Writes
``<work>/rerun_vs_cache.md`` and ``.json``; ``uptime`` at the start and after every E.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "data" / "models" / "digits-ddpm"
BLOCK, TIMESTEP, POOL, SEED, TEST_FRACTION = "mid_block", 50, 2, 0, 0.2
LR, MOMENTUM, WEIGHT_DECAY, GAMMA, BATCH, FORWARD_BATCH = 0.05, 0.9, 1e-4, 0.1, 32, 128

WORKFLOW = """\
name: rvc
output_dir: out
cluster: {{kind: local, n_workers: 2, threads_per_worker: 1, memory_limit: 3GiB}}
stages:
  - name: extract
    stage: extract
    model: {{path: {model}, null_class: 10}}
    dataset: {dataset}
    blocks: [{block}]
    timesteps: [{t}]
    conditioning: null
    batch_size: {fb}
  - {{name: pool, stage: pool, input: extract, sizes: [{pool}]}}
  - name: probe
    stage: probe
    input: pool
    test_fraction: {tf}
    val_fraction: 0.0
    batch_size: {batch}
    seed: {seed}
    heads: [{{name: linear, head: {{kind: linear}}}}]
    train: {{optimizer: sgd, lr: {lr}, momentum: {mom}, weight_decay: {wd}, schedule: step,
             step_size: {step}, gamma: {gamma}, epochs: {epochs}}}
"""


def step_size(epochs: int) -> int:
    return max(1, epochs // 4)


def dataset_yaml(name: str, work: Path) -> str:
    if name == "digits":
        return "{reader: digits, split: all}"
    return f"{{reader: imagefolder, root: {synthetic_images(name, work)}, split: all}}"


def synthetic_images(name: str, work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scale import write_images

    n = int(name.removeprefix("synth"))
    root = work / f"images-{n}"
    write_images(root, n)
    return root


# ----------------------------------------------------------------- the re-run side (a child)


def rerun_child(dataset: str, work: Path, epochs: int) -> dict:
    """Train the head with a forward of every train image in every epoch; returns timings + accuracy."""
    start = time.perf_counter()
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from pipeline.datasets import DatasetConfig, open_dataset
    from pipeline.datasets.torch_data import load_images
    from pipeline.hooks import capture, run_truncated
    from pipeline.models import Condition, ModelConfig, load_model
    from stages.probe import split_by_image

    if dataset == "digits":
        reader = open_dataset(DatasetConfig(reader="digits", split="all"))
    else:
        reader = open_dataset(DatasetConfig(reader="imagefolder", root=str(synthetic_images(dataset, work)),
                                            split="all"))
    adapter = load_model(ModelConfig(path=str(DIGITS), null_class=10), "cpu")
    prep = adapter.preprocessing.with_resize("direct")
    arrays, _ = load_images(reader, prep, range(len(reader.records)), 0)
    x_all = torch.from_numpy(np.stack([arrays[i] for i in range(len(reader.records))])).float()
    y_all = torch.tensor([r.label for r in reader.records])
    ids = np.array([r.image_id for r in reader.records], dtype=object)
    train_idx, test_idx = split_by_image(ids, np.ones(len(ids), bool), TEST_FRACTION, SEED)
    ready = time.perf_counter()

    @torch.no_grad()
    def features(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        t = torch.full((len(x0),), TIMESTEP, dtype=torch.long)
        eps = torch.randn(x0.shape, generator=generator)
        x_t = adapter.add_noise(x0, eps, t)
        cond = Condition("null", labels=torch.full((len(x0),), 10, dtype=torch.long))
        with capture(adapter.module, [BLOCK], stop_after=BLOCK) as got:
            run_truncated(lambda: adapter.run(x_t, t, cond))
        return torch.nn.functional.adaptive_avg_pool2d(got[BLOCK].float(), POOL).flatten(1)

    torch.manual_seed(SEED)
    n_features = features(x_all[:2], torch.Generator().manual_seed(0)).shape[1]
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(n_features, affine=False), torch.nn.Linear(n_features, 10))
    opt = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size(epochs), gamma=GAMMA)
    rng = np.random.default_rng(SEED)
    forward_s = 0.0
    train_start = time.perf_counter()
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(1000 + epoch)  # a fresh draw every epoch
        order = train_idx[rng.permutation(len(train_idx))]
        head.train()
        for b0 in range(0, len(order), FORWARD_BATCH):
            idx = torch.from_numpy(order[b0:b0 + FORWARD_BATCH])
            began = time.perf_counter()
            feats = features(x_all[idx], generator)
            forward_s += time.perf_counter() - began
            labels = y_all[idx]
            for s0 in range(0, len(idx), BATCH):
                if len(idx[s0:s0 + BATCH]) < 2:
                    continue  # BatchNorm needs two samples
                loss = torch.nn.functional.cross_entropy(head(feats[s0:s0 + BATCH]), labels[s0:s0 + BATCH])
                opt.zero_grad()
                loss.backward()
                opt.step()
        sched.step()
    train_s = time.perf_counter() - train_start
    head.eval()
    correct = 0
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for b0 in range(0, len(test_idx), FORWARD_BATCH):
            idx = torch.from_numpy(test_idx[b0:b0 + FORWARD_BATCH])
            correct += int((head(features(x_all[idx], generator)).argmax(1) == y_all[idx]).sum())
    return {"setup_s": ready - start, "forward_s": forward_s, "train_s": train_s,
            "accuracy": correct / len(test_idx),
            "n_train": int(len(train_idx)), "n_test": int(len(test_idx))}


# ----------------------------------------------------------------- the parent


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return elapsed


def run_rerun(dataset: str, work: Path, epochs: int) -> dict:
    out = work / f"rerun-{dataset}-e{epochs}.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    wall = timed([sys.executable, __file__, "--child", dataset, "--epochs", str(epochs), "--work", str(work),
                  "--json", str(out)], ROOT, env, out.with_suffix(".log"))
    return json.loads(out.read_text()) | {"wall_s": wall}


def run_diffprobe(tree: Path, label: str, dataset: str, work: Path, epochs: int) -> dict:
    folder = work / f"dp-{label}-{dataset}-e{epochs}"
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.mkdir(parents=True)
    wf = folder / "wf.yaml"
    wf.write_text(WORKFLOW.format(model=DIGITS, dataset=dataset_yaml(dataset, work), block=BLOCK, t=TIMESTEP,
                                  fb=FORWARD_BATCH, pool=POOL, tf=TEST_FRACTION, batch=BATCH, seed=SEED, lr=LR,
                                  mom=MOMENTUM, wd=WEIGHT_DECAY, step=step_size(epochs), gamma=GAMMA,
                                  epochs=epochs))
    env = dict(os.environ, PYTHONPATH=str(tree))
    log = folder / "run.log"
    wall = timed([sys.executable, "-m", "pipeline.cli", "run", str(wf), "--no-progress"], tree, env, log)
    stages = {}
    for line in log.read_text().splitlines():
        if "] finished in " in line:
            name = line.split("]")[0].lstrip("[")
            stages[name] = float(line.split("finished in ")[1].split()[0])
    import csv

    rows = list(csv.DictReader(open(folder / "out" / "probe.probe" / "results.csv")))
    return {"wall_s": wall, "stages_s": stages, "accuracy": float(rows[0]["top1"]),
            "train_s": float(rows[0]["train_time_s"]), "epochs_run": int(rows[0]["epochs_run"])}


def line(runs: list[tuple[int, dict]]) -> tuple[float, float]:
    """(fixed, per_epoch) seconds of one side, from its runs: ``fixed`` = wall minus the
    epochs' training time, ``per_epoch`` = training time / E (each a mean over runs); the
    re-run side's training time holds its forwards, diffprobe's only the probe's epochs."""
    fixed = [r["wall_s"] - r["train_s"] for _, r in runs]
    per = [r["train_s"] / e for e, r in runs]
    return sum(fixed) / len(fixed), sum(per) / len(per)


def markdown(results: dict, loads: list[str], sides: list[str], project: list[int]) -> str:
    lines = [f"load: {loads[0]} (start) / {loads[-1]} (end)", ""]
    for dataset, rows in results.items():
        lines += [f"**{dataset}** (measured)", "",
                  "| E | rerun s (top-1) | " + " | ".join(f"{s} s (top-1) | rerun / {s}" for s in sides) + " |",
                  "|---|---|" + "---|---|" * len(sides)]
        for e, row in sorted(rows.items()):
            cells = [f"{row['rerun']['wall_s']:.1f} ({row['rerun']['accuracy']:.3f})"]
            for s in sides:
                if s in row:
                    cells += [f"{row[s]['wall_s']:.1f} ({row[s]['accuracy']:.3f})",
                              f"{row['rerun']['wall_s'] / row[s]['wall_s']:.2f}x"]
                else:
                    cells += ["—", "—"]
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
        a, b = line([(e, r["rerun"]) for e, r in rows.items()])
        lines += ["", f"rerun: {a:.1f} s fixed + {b:.2f} s per epoch"]
        for s in sides:
            runs = [(e, r[s]) for e, r in rows.items() if s in r]
            if not runs:
                continue
            c, d = line(runs)
            even = (c - a) / (b - d) if b > d else float("inf")
            at = ", ".join(f"E={e}: {(a + b * e) / (c + d * e):.2f}x" for e in project)
            lines.append(f"{s}: {c:.1f} s fixed + {d:.3f} s per epoch; break-even E = {even:.2f}; "
                         f"rerun / {s} from these lines at {at}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="digits,synth10000")
    ap.add_argument("--epochs", default="1,5,28")
    ap.add_argument("--work", type=Path, default=Path("/tmp/rerun-vs-cache"))
    ap.add_argument("--base", type=Path, help="another diffprobe checkout, run as a third side")
    ap.add_argument("--base-epochs", default=None, help="epochs for --base (default: --epochs)")
    ap.add_argument("--project", default="1,2,5,28", help="E values at which the fitted lines are compared")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child:
        args.json.write_text(json.dumps(rerun_child(args.child, args.work, int(args.epochs))))
        return
    epochs = [int(e) for e in args.epochs.split(",")]
    base_epochs = [int(e) for e in (args.base_epochs or args.epochs).split(",")]
    sides = ["diffprobe"] + (["base"] if args.base else [])
    loads = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    results: dict = {}
    for dataset in args.datasets.split(","):
        if dataset != "digits":
            synthetic_images(dataset, args.work)
        results[dataset] = {}
        for e in epochs:
            row = results[dataset][e] = {}
            row["rerun"] = run_rerun(dataset, args.work, e)
            row["diffprobe"] = run_diffprobe(ROOT, "new", dataset, args.work, e)
            if args.base and e in base_epochs:
                row["base"] = run_diffprobe(args.base, "base", dataset, args.work, e)
            print(dataset, e, json.dumps(row), flush=True)
            loads.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    text = markdown(results, loads, sides, [int(e) for e in args.project.split(",")])
    (args.work / "rerun_vs_cache.md").write_text(text)
    (args.work / "rerun_vs_cache.json").write_text(json.dumps({"results": results, "loads": loads}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
