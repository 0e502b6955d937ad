"""How far k stored views approximate fresh augmentation draws every epoch.

The paper (2307.08702) trains its heads for 28 epochs on a fresh random crop, flip
and noise draw of every image at every step; a cache stores k views per image. On
the shipped digits model (block, timestep, 2x2 average pooling, linear head with
SGD + a step schedule, plain torch) this script trains:

- ``k=1``: the centre view only (view 0), every epoch;
- ``k=K all``: every stored view 0..K-1 each epoch (what the probe stage does with
  ``train_views: all``; K times the steps per epoch);
- ``k=K cycle``: epoch e uses view e % K (the same steps as fresh draws);
- ``k=K random``: views 1..K-1 each epoch (the paper's protocol, ``train_views``);
- ``fresh``: epoch e uses view e + 1, a new random crop, flip and noise per epoch
  (what the reference's loader does; E x N forwards).

Every run tests on the centre view 0 of the 360 test digits; views come from
``pipeline.datasets.augment`` and noise from ``pipeline.noise`` exactly as the
extract stage draws them. Prints one line per setting: mean and spread of top-1
over ``--repeats`` head seeds.

    python benchmarks/augment_views.py --epochs 28 --repeats 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.datasets import DatasetConfig, open_dataset
from pipeline.datasets.augment import AugmentSpec, random_view, view_flipped
from pipeline.datasets.preprocess import preprocess
from pipeline.hooks import capture, run_truncated
from pipeline.models import Condition, ModelConfig, load_model
from pipeline.noise import batch_noise

ROOT = Path(__file__).resolve().parent.parent


def view_input(img, prep, spec, seed, image_id, view) -> np.ndarray:
    if view == 0:
        x = preprocess(img, prep)
    else:
        x = preprocess(img, prep, resize_crop=lambda c: random_view(c, prep.size, spec, seed, image_id, view)[0])
    return x[..., ::-1].copy() if view_flipped(spec, seed, image_id, view) else x


@torch.no_grad()
def features(adapter, prep, reader, images, view, block, t, seed, pool=2, batch=256) -> np.ndarray:
    """(N, C * pool * pool) pooled block output of one view of every image."""
    spec, out = AugmentSpec(), []
    for b0 in range(0, len(images), batch):
        idx = range(b0, min(b0 + batch, len(images)))
        recs = [reader.records[i] for i in idx]
        x0 = torch.from_numpy(np.stack([view_input(images[i], prep, spec, seed, reader.records[i].image_id, view)
                                        for i in idx]))
        ts = torch.full((len(recs),), t, dtype=torch.long)
        eps = batch_noise(seed, [r.image_id for r in recs], [view] * len(recs), [t] * len(recs), x0.shape[1:])
        x_t = adapter.add_noise(x0, eps, ts)
        cond = Condition("null", labels=torch.full((len(recs),), adapter.null_class, dtype=torch.long))
        with capture(adapter.module, [block], stop_after=block) as got:
            run_truncated(lambda x_t=x_t, ts=ts, cond=cond: adapter.forward(x_t, ts, cond))
        out.append(torch.nn.functional.adaptive_avg_pool2d(got[block].float(), pool).flatten(1).numpy())
    return np.concatenate(out)


def train_linear(per_epoch, x_test, y_test, epochs, seed, lr=0.05, batch=32) -> float:
    """SGD (momentum 0.9, wd 1e-4), step schedule every epochs // 4, on standardised tensors;
    ``per_epoch(e)`` gives epoch e's (features, labels)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = torch.nn.Linear(x_test.shape[1], 10)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, epochs // 4), gamma=0.1)
    for epoch in range(epochs):
        x, labels = per_epoch(epoch)
        order = torch.from_numpy(rng.permutation(len(x)))
        for b0 in range(0, len(x), batch):
            idx = order[b0 : b0 + batch]
            loss = torch.nn.functional.cross_entropy(head(x[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        pred = head(x_test).argmax(1)
    return float((pred == y_test).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", default="mid_block")
    parser.add_argument("--timestep", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=None, help="an .npz to keep the features in between runs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny GEMMs; more threads only spin on a shared machine
    adapter = load_model(ModelConfig(path=str(ROOT / "data/models/digits-ddpm"), null_class=10), "cpu", "float32")
    prep = adapter.preprocessing.with_resize("adm")
    train, test = (open_dataset(DatasetConfig(reader="digits", split=s)) for s in ("train", "test"))
    train_images = [train.load_image(r) for r in train.records]
    test_images = [test.load_image(r) for r in test.records]
    y = np.array([r.label for r in train.records])
    y_test = np.array([r.label for r in test.records])
    start = time.perf_counter()
    n_views = max(max(args.ks), args.epochs + 1)
    if args.cache and args.cache.exists():
        saved = np.load(args.cache)
        stored, x_test = saved["train"], saved["test"]
    else:
        stored = np.stack([features(adapter, prep, train, train_images, v, args.block, args.timestep, args.seed)
                           for v in range(n_views)])
        x_test = features(adapter, prep, test, test_images, 0, args.block, args.timestep, args.seed)
        if args.cache:
            np.savez(args.cache, train=stored, test=x_test)
    print(f"# {n_views} views x {len(y)} train images + {len(y_test)} test, {args.block} t={args.timestep}, "
          f"pooled 2x2: features in {time.perf_counter() - start:.0f} s")
    mean, std = stored[0].mean(0), stored[0].std(0) + 1e-6  # the centre views' statistics, for every run
    views = {v: torch.from_numpy((stored[v] - mean) / std).float() for v in range(n_views)}
    x_test = torch.from_numpy((x_test - mean) / std).float()
    y, y_test = torch.from_numpy(y), torch.from_numpy(y_test)

    def stacked(vs):
        return torch.cat([views[v] for v in vs]), y.repeat(len(vs))

    settings = {"k=1 (centre only)": lambda e: (views[0], y)}
    for k in args.ks:
        settings[f"k={k} all views each epoch"] = lambda e, k=k: stacked(range(k))
        settings[f"k={k} cycle (epoch e: view e % k)"] = lambda e, k=k: (views[e % k], y)
        settings[f"k={k} random views 1..k-1 only"] = lambda e, k=k: stacked(range(1, k))
    settings[f"fresh draw every epoch ({args.epochs} draws)"] = lambda e: (views[e + 1], y)
    for name, per_epoch in settings.items():
        accs = [train_linear(per_epoch, x_test, y_test, args.epochs, seed) for seed in range(args.repeats)]
        print(f"{name:42s} top-1 {np.mean(accs):.4f} +- {np.std(accs):.4f}  ({', '.join(f'{a:.3f}' for a in accs)})")


if __name__ == "__main__":
    main()
