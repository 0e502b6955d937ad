"""Diffusion Classifier cost on digits: exhaustive vs adaptive, batch-size scaling, and
classify throughput as a ratio of the bare forward throughput of the same model.

Part 1 classifies held-out digits exhaustively and with adaptive schedules (same
plan grid, same eps per timestep) and reports accuracy, forward passes and wall time
per image. Part 2, per batch size, times (a) the bare forward, ``adapter.forward`` on
ready-made (x_t, t, label) batches of that size, and (b) the whole classify path for
the same number of forwards: decode + preprocess, per-(image, t) eps draws, q_sample,
batching across samples/trials/classes, the three losses, elimination bookkeeping and
the background Zarr writer. Ratio = classify forwards/s / bare forwards/s, medians of
interleaved repeats. On CPU the classify run also reports the share of its wall time
spent inside the model's forward: measured within one run, it does not suffer from the
load changing between runs on a shared machine.

    .venv/bin/python benchmarks/classify_throughput.py [--images 360] [--trials 20] [--threads 1]

Uses data/models/digits-ddpm when it exists, else a random-init model of the same
architecture (accuracy is then chance, throughput still meaningful).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import store  # noqa: E402
from pipeline.store import error_tensor as errorstore  # noqa: E402
from pipeline.dc import rescore  # noqa: E402
from pipeline.datasets import DatasetConfig  # noqa: E402
from pipeline.models import ModelConfig  # noqa: E402
from stages.classify import ClassifyConfig, Classifier, ScheduleConfig, classify_units  # noqa: E402

DIGITS = ROOT / "data" / "models" / "digits-ddpm"
#: the shipped model's architecture (data/models/train_digits.py), for a random twin
DIGITS_ARCH = {
    "sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [32, 64, 64],
    "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
    "num_class_embeds": 11, "attention_head_dim": 32,
}


def model_config(work: Path, folder: Path = DIGITS) -> tuple[ModelConfig, str]:
    if (folder / "unet" / "config.json").exists():
        return ModelConfig(path=str(folder), null_class=10), f"{folder} (trained)"
    (work / "digits_arch.json").write_text(json.dumps(DIGITS_ARCH))
    random_twin = ModelConfig(config=str(work / "digits_arch.json"), null_class=10)
    return random_twin, "random-init digits architecture"


def run_classify(cfg: ClassifyConfig, out: Path) -> dict:
    """Classify into a fresh store; wall time excludes model loading and store creation."""
    clf = Classifier(cfg)
    records = clf.reader.records
    attrs = {"stage": "classify", "stage_hash": "benchmark", "plan": clf.plan.to_dict(),
             "schedule": clf.schedule_attrs(), "provenance": clf.provenance()}
    shutil.rmtree(out, ignore_errors=True)
    errorstore.create_error_store(out, clf.layout, [r.image_id for r in records], [r.label for r in records],
                                  clf.class_names, clf.candidate_class, clf.candidate_prompt,
                                  clf.plan.trial_timesteps, clf.plan.trial_draws, attrs)
    in_forward = [0.0]
    if clf.device.type == "cpu":  # synchronous: time inside the model's forward is measurable
        forward = clf.adapter.forward

        def timed(*a, **kw):
            begin = time.perf_counter()
            try:
                return forward(*a, **kw)
            finally:
                in_forward[0] += time.perf_counter() - begin

        clf.adapter.forward = timed
    start = time.perf_counter()
    classify_units(clf, out, list(range(clf.layout.n_units)), progress=False)
    wall = time.perf_counter() - start
    store.finalize(out)
    result = rescore.score_store(out)
    n = len(records)
    return {"accuracy": result["accuracy"], "forwards": clf.forward_passes, "wall": wall,
            "forwards_per_image": clf.forward_passes / n, "seconds_per_image": wall / n,
            "rate": clf.forward_passes / wall, "forward_share": in_forward[0] / wall}


def bare_rate(clf: Classifier, batch: int, n_forwards: int) -> float:
    """Forwards/s of ``adapter.forward`` alone on ready (x_t, t, label) batches of ``batch``."""
    a = clf.adapter
    gen = torch.Generator().manual_seed(0)
    shape = (batch, a.latent_channels, a.latent_size, a.latent_size)
    x = torch.randn(shape, generator=gen).to(clf.device, clf.dtype)
    t = torch.randint(0, a.num_train_timesteps, (batch,), generator=gen).to(clf.device)
    cond = clf.condition(torch.randint(0, clf.n_candidates, (batch,), generator=gen).to(clf.device))
    n_batches = max(1, round(n_forwards / batch))
    with torch.inference_mode():
        a.forward(x, t, cond)  # warm-up
        if clf.device.type == "cuda":
            torch.cuda.synchronize(clf.device)
        start = time.perf_counter()
        for _ in range(n_batches):
            a.forward(x, t, cond)
        if clf.device.type == "cuda":
            torch.cuda.synchronize(clf.device)
    return n_batches * batch / (time.perf_counter() - start)


def schedules_table(args, model: ModelConfig, work: Path) -> None:
    """Accuracy, forwards and wall time per image: exhaustive and adaptive schedules, one plan grid."""
    n = args.trials
    schedules = {  # name -> (plan trials, schedule); adaptive ones share the n-trial grid
        f"exhaustive, {n} trials": (n, ScheduleConfig()),
        f"exhaustive, {n // 2} trials": (n // 2, ScheduleConfig()),
        f"[{n // 2}, {n}] / [3, 1]": (n, ScheduleConfig((n // 2, n), (3, 1))),
        f"[{n // 4}, {n}] / [2, 1]": (n, ScheduleConfig((n // 4, n), (2, 1))),
        f"[{n // 10}, {n // 4}, {n}] / [5, 2, 1]": (n, ScheduleConfig((n // 10, n // 4, n), (5, 2, 1))),
    }
    heldout = DatasetConfig(reader="digits", split="test", limit=args.images, seed=0)
    print(f"\n## exhaustive vs adaptive: {args.images} held-out digits, even trials, batch {args.batch}")
    print("| schedule | accuracy | forwards / image | s / image | forwards/s |\n|---|---|---|---|---|")
    for name, (n_trials, schedule) in schedules.items():
        cfg = ClassifyConfig(model=model, dataset=heldout, n_timesteps=n_trials, schedule=schedule,
                             batch_size=args.batch, device=args.device)
        r = run_classify(cfg, work / "store.zarr")
        print(f"| {name} | {r['accuracy']:.3f} | {r['forwards_per_image']:.0f} | "
              f"{r['seconds_per_image']:.3f} | {r['rate']:.0f} |", flush=True)


def scaling_table(args, model: ModelConfig, work: Path) -> None:
    """Per batch size: bare forward vs whole classify path, forwards/s, medians of interleaved repeats."""
    print(f"\n## throughput vs bare forward: {args.scaling_images} images x 10 classes x {args.trials} "
          f"trials (exhaustive), medians of {args.repeats} interleaved repeats")
    print("| batch | bare forwards/s | classify forwards/s | ratio | classify wall share in forward |\n"
          "|---|---|---|---|---|")
    subset = DatasetConfig(reader="digits", split="test", limit=args.scaling_images, seed=1)
    for batch in (int(b) for b in args.batches.split(",")):
        cfg = ClassifyConfig(model=model, dataset=subset, n_timesteps=args.trials, batch_size=batch,
                             device=args.device)
        clf = Classifier(cfg)
        n_forwards = args.scaling_images * clf.n_classes * args.trials
        bare, full, share = [], [], []
        for _ in range(args.repeats):
            bare.append(bare_rate(clf, batch, n_forwards))
            r = run_classify(cfg, work / "store.zarr")
            full.append(r["rate"])
            share.append(r["forward_share"])
        b, f = statistics.median(bare), statistics.median(full)
        print(f"| {batch} | {b:.0f} | {f:.0f} | {f / b:.3f} | {statistics.median(share):.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=360, help="held-out digits for the schedules table")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="batch size for the schedules table")
    ap.add_argument("--scaling-images", type=int, default=16, help="images per timing in the scaling table")
    ap.add_argument("--batches", default="16,64,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", type=Path, default=DIGITS, help="a digits-ddpm pipeline folder")
    ap.add_argument("--parts", default="schedules,scaling", help="comma-separated: schedules, scaling")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="dp-classify-bench-"))
    try:
        model, model_name = model_config(work, args.model)
        print(f"model: {model_name}; device {args.device}; torch threads {args.threads}", flush=True)
        parts = set(args.parts.split(","))
        if "schedules" in parts:
            schedules_table(args, model, work)
        if "scaling" in parts:
            scaling_table(args, model, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
