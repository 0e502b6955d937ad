"""How long a probe grid trains, from a few timed steps of each head (``diffprobe plan``).

A grid cell trains one head for at most ``epochs`` epochs of ``ceil(n_fit / batch_size)``
optimiser steps, evaluates the validation split after every epoch and the test split
once (``pipeline.probing.training.train_heads``). The estimate times the head's real
optimiser step (:func:`pipeline.probing.training.training_step`) on a synthetic batch of
the cell's shape and batch size, and its evaluation forward on an ``eval_batch_size``
batch, with the torch threads the probe's workers use, then multiplies by the counts.
A head too slow to time at its batch size (over ``AFFORDABLE_S`` a call) is timed at
``SMALL_BATCH`` and scaled by the batch. It is an upper bound on the training compute
(early stopping with ``patience`` ends sooner) and leaves out reading the features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.estimate import Estimate, Sample, measure
from pipeline.probing.heads import HeadSpec
from pipeline.probing.training import HeadJob, TrainSpec, training_step


@dataclass(frozen=True)
class CellGroup:
    """The cells of one (block, pool) read: their feature shape, timesteps and heads."""

    block: str
    pool: int
    shape: tuple[int, int, int]
    n_timesteps: int
    heads: tuple[tuple[str, HeadSpec, TrainSpec], ...]


@dataclass(frozen=True)
class SplitSizes:
    """Samples each head sees: fitting set (trained on), validation and test."""

    n_fit: int
    n_val: int
    n_test: int


def split_sizes(n_train_side: int, n_test: int, val_fraction: float, train_share: float = 1.0,
                test_share: float = 1.0) -> SplitSizes:
    """Sizes from the samples on each side of the train/test split; ``*_share``: the share of
    views ``train_views`` / ``test_views`` keep."""
    n_val = round(n_train_side * val_fraction)
    return SplitSizes(max(1, round((n_train_side - n_val) * train_share)), round(n_val * train_share),
                      max(1, round(n_test * test_share)))


#: measured samples in this process: {(head, recipe, shape, batch, threads, kind of call): Sample}
_SAMPLES: dict[tuple, Sample] = {}


def _timed(key: tuple, fn) -> Sample:
    if key not in _SAMPLES:
        _SAMPLES[key] = measure(fn, warmup=2, repeats=5, budget_s=2.0, threads=key[-2])
    return _SAMPLES[key]


def step_sample(head: HeadSpec, recipe: TrainSpec, shape: tuple[int, ...], num_classes: int, batch: int,
                threads: int) -> Sample:
    """One optimiser step of ``head`` on a random ``(batch, *shape)`` batch, timed."""
    import torch

    step, _ = training_step(HeadJob(head, recipe), shape, num_classes)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *shape), generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    return _timed((head, recipe.optimizer, shape, num_classes, batch, threads, "step"), lambda: step(x, y))


def eval_sample(head: HeadSpec, shape: tuple[int, ...], num_classes: int, batch: int, threads: int) -> Sample:
    """One evaluation forward (inference mode) of ``head`` on a ``(batch, *shape)`` batch, timed."""
    import torch

    _, model = training_step(HeadJob(head, TrainSpec()), shape, num_classes)
    model.eval()
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.inference_mode():
            model(x).topk(min(5, num_classes), dim=1)

    return _timed((head, "eval", shape, num_classes, batch, threads, "eval"), forward)


def probe_estimates(groups: list[CellGroup], sizes: SplitSizes, num_classes: int, batch_size: int,
                    eval_batch_size: int, threads: int, workers: int) -> list[Estimate]:
    """Two estimates per (group, head): its training steps and its evaluation batches.

    Training: ``epochs x ceil(n_fit / batch_size)`` steps per timestep. Evaluation:
    ``epochs x ceil(n_val / e) + ceil(n_test / e)`` forwards of ``e = min(eval_batch_size,
    n_fit)`` samples per timestep. ``workers``: groups running side by side (one task each).
    """
    batch = max(1, min(batch_size, sizes.n_fit))
    eval_batch = max(1, min(eval_batch_size, sizes.n_fit))
    out = []
    for g in groups:
        for name, head, recipe in g.heads:
            steps = recipe.epochs * math.ceil(sizes.n_fit / batch) * g.n_timesteps
            sample, timed = _at_affordable_batch(
                lambda b: step_sample(head, recipe, g.shape, num_classes, b, threads), batch)
            out.append(Estimate(f"step of {name!r} on {g.shape} x {timed}", sample, steps, scale=batch / timed,
                                workers=workers))
            evals = (recipe.epochs * math.ceil(sizes.n_val / eval_batch) if sizes.n_val else 0) \
                + math.ceil(sizes.n_test / eval_batch)
            sample, timed = _at_affordable_batch(
                lambda b: eval_sample(head, g.shape, num_classes, b, threads), eval_batch)
            out.append(Estimate(f"eval of {name!r} on {g.shape} x {timed}", sample, evals * g.n_timesteps,
                                scale=eval_batch / timed, workers=workers))
    return out


#: A timed call longer than this (predicted from a batch of SMALL_BATCH) is timed at that
#: batch and scaled by batch size instead (a paper-size attention head's step on a
#: batch of 128 is ~90 s on one core; its cost is linear in the batch at that size).
AFFORDABLE_S = 0.5
SMALL_BATCH = 8


def _at_affordable_batch(timed_at, batch: int) -> tuple[Sample, int]:
    """``(sample, batch it was timed at)``: the real batch, unless a call there would take
    over ``AFFORDABLE_S`` as predicted from a small batch; then the small batch."""
    if batch <= SMALL_BATCH:
        return timed_at(batch), batch
    small = timed_at(SMALL_BATCH)
    if small.seconds * batch / SMALL_BATCH > AFFORDABLE_S:
        return small, SMALL_BATCH
    return timed_at(batch), batch
