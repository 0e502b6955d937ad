"""Train several probe heads from one stream of minibatches.

A probe-grid cell is (slice of features, head, training recipe). Cells that read
the same data are trained together: every minibatch is read once from a
:class:`BatchSource` and handed to every head of the group, so the cost in reads is
that of one head, whatever the number of heads, learning rates or timesteps.

The batch source protocol
-------------------------
A source serves samples ``0 .. n-1``, each carrying one or more named feature
*slices* (e.g. ``"t150"`` and ``"t300"`` for two timesteps of one block) of shape
``(C, p, p)``, and an integer label. It has

``shapes: Mapping[str, tuple[int, ...]]``
    one sample's shape per slice key;
``labels: np.ndarray``
    ``(n,)`` int64, every sample's label (small enough to hold in memory);
``iter_batches(indices, batch_size, *, keys, shuffle, seed, epoch)``
    yields ``(x, y)`` with ``x = {key: (B, C, p, p) array}`` for the requested keys
    (float32, or float16 which is converted here) and ``y: (B,) int64``, covering
    each of ``indices`` exactly once. With ``shuffle=False`` the order is that of
    ``indices``; with ``shuffle=True`` it is a permutation that depends only on
    ``(indices, seed, epoch)``, so a run is reproducible. Batches hold
    ``batch_size`` samples except possibly the last.

:class:`ArraySource` implements it over in-memory arrays; the probe stage implements
it over a Zarr store (shuffled chunk order + in-buffer shuffle), so the data need
not fit in memory.

What one call of :func:`train_heads` reads: one pass over the fitting set for the
standardisation statistics, then per epoch one shuffled pass over it and one pass
over the validation set, and finally one pass over the test set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.probing.splits import split_groups
from pipeline.probing.heads import HeadSpec, build_head, count_parameters

#: torch's default generator is one per process. Heads trained in several threads of
#: one process (a dask worker with threads_per_worker > 1) take turns where they
#: use it (initial weights, dropout masks), so results do not depend on timing.
_TORCH_RNG = threading.Lock()

#: Slice key of a source built from a single array.
DEFAULT_KEY = "x"
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "constant")

Batch = tuple[dict[str, np.ndarray], np.ndarray]


class BatchSource(Protocol):
    """Where minibatches come from; see the module docstring for the contract."""

    shapes: Mapping[str, tuple[int, ...]]
    labels: np.ndarray

    def iter_batches(
        self,
        indices: np.ndarray,
        batch_size: int,
        *,
        keys: Sequence[str],
        shuffle: bool,
        seed: int,
        epoch: int,
    ) -> Iterator[Batch]: ...


class ArraySource:
    """A :class:`BatchSource` over in-memory arrays.

    Parameters
    ----------
    features : (n, C, p, p) array, or mapping of slice key -> (n, C, p, p) array
        A bare array is served under the key ``"x"``.
    labels : (n,) int
    """

    def __init__(self, features: np.ndarray | Mapping[str, np.ndarray], labels: np.ndarray):
        if not isinstance(features, Mapping):
            features = {DEFAULT_KEY: features}
        self.labels = np.asarray(labels, dtype=np.int64)
        self.features = {str(k): np.asarray(v) for k, v in features.items()}
        for key, value in self.features.items():
            if value.ndim != 4 or len(value) != len(self.labels):
                raise ConfigError(
                    f"feature slice {key!r} has shape {value.shape}; expected "
                    f"({len(self.labels)}, C, p, p) to match {len(self.labels)} labels"
                )
        self.shapes = {k: tuple(v.shape[1:]) for k, v in self.features.items()}

    def iter_batches(self, indices, batch_size, *, keys, shuffle, seed, epoch) -> Iterator[Batch]:
        order = np.asarray(indices, dtype=np.int64)
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(order)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            yield {k: self.features[k][rows] for k in keys}, self.labels[rows]


@dataclass(frozen=True)
class TrainSpec:
    """How one head is optimised; validated on construction.

    The paper's recipe (its released scripts: plain ``torch.optim.SGD``, ``StepLR(7, 0.1)``)
    is ``TrainSpec("sgd", lr=0.01 (linear) or 0.05 (attention), momentum=0.0,
    weight_decay=0.0, schedule="step", step_size=7, gamma=0.1, epochs=28)``. ``patience`` (epochs without a better
    validation accuracy) stops a head early; ``None`` trains all epochs. With a
    validation split the weights of the best validation epoch are kept either way.
    """

    optimizer: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    step_size: int = 7
    gamma: float = 0.1
    epochs: int = 30
    patience: int | None = None

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0; got {self.lr!r}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(
                f"need weight_decay >= 0 and 0 <= momentum < 1; got {self.weight_decay!r}, {self.momentum!r}"
            )
        for name in ("epochs", "step_size"):
            if not _is_int(getattr(self, name), minimum=1):
                raise ConfigError(f"{name} must be an integer >= 1; got {getattr(self, name)!r}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"step schedule gamma must be in (0, 1]; got {self.gamma!r}")
        if self.patience is not None and not _is_int(self.patience, minimum=1):
            raise ConfigError(f"patience must be an integer >= 1 or None; got {self.patience!r}")


@dataclass(frozen=True)
class HeadJob:
    """One head to train: its architecture, its recipe and the feature slice it reads."""

    head: HeadSpec = field(default_factory=HeadSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    key: str = DEFAULT_KEY

    def __post_init__(self):
        if not isinstance(self.head, HeadSpec) or not isinstance(self.train, TrainSpec):
            raise ConfigError(
                f"HeadJob needs a HeadSpec and a TrainSpec; got {type(self.head).__name__}, "
                f"{type(self.train).__name__}"
            )


class RunningMoments:
    """Per-feature mean and (population) std over batches, merged in float64 (Chan et al.)."""

    def __init__(self, shape: tuple[int, ...]):
        self.count = 0
        self.mean = np.zeros(shape, dtype=np.float64)
        self.m2 = np.zeros(shape, dtype=np.float64)

    def update(self, batch: np.ndarray) -> None:
        """Add a ``(B, *shape)`` batch."""
        batch = np.asarray(batch, dtype=np.float64)
        n_b = len(batch)
        if n_b == 0:
            return
        mean_b = batch.mean(axis=0)
        m2_b = ((batch - mean_b) ** 2).sum(axis=0)
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / total)
        self.m2 += m2_b + delta**2 * (self.count * n_b / total)
        self.count = total

    def std(self) -> np.ndarray:
        """Population std; features that never vary get 1 (as scikit-learn's StandardScaler)."""
        std = np.sqrt(self.m2 / max(self.count, 1))
        std[std < 1e-12] = 1.0
        return std


class Standardized(nn.Module):
    """A head behind fixed standardisation: ``head((x - mean) / std)``.

    ``mean`` and ``std`` have one sample's shape ``(C, p, p)``: every element of the
    pooled map is a feature, as for a ``StandardScaler`` on the flattened map.
    """

    def __init__(self, head: nn.Module, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.head = head
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("inv_std", torch.as_tensor(1.0 / std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x - self.mean) * self.inv_std)


def split_validation(
    train_idx: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Carve a validation set out of ``train_idx``; returns sorted ``(fit_idx, val_idx)``.

    Parameters
    ----------
    train_idx : (m,) int
        Sample positions of the training split.
    fraction : float in [0, 1)
        Share of *groups* sent to validation (at least one when > 0).
    seed : int
    groups : (n,) array indexed by sample position, optional
        Samples sharing a group (e.g. views of one ``image_id``) land on the same
        side. Without it every sample is its own group.
    """
    train_idx = np.asarray(train_idx, dtype=np.int64)
    if not 0 <= fraction < 1:
        raise ConfigError(f"validation fraction must be in [0, 1); got {fraction!r}")
    if fraction == 0:
        return np.sort(train_idx), np.empty(0, dtype=np.int64)
    keys = train_idx if groups is None else np.asarray(groups)[train_idx]
    in_val = split_groups(keys, fraction, seed, 0x5A11D, "validation")
    return np.sort(train_idx[~in_val]), np.sort(train_idx[in_val])


class _HeadRun:
    """One head's model, optimiser and private RNG stream during a shared pass."""

    def __init__(self, job: HeadJob, model: Standardized):
        self.job = job
        self.model = model
        spec = job.train
        if spec.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(
                model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
            )
        else:
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        if spec.schedule == "step":
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, spec.step_size, spec.gamma)
        elif spec.schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=spec.epochs)
        else:
            self.scheduler = None
        self.rng_state = torch.get_rng_state()
        self.active = True
        self.diverged = False
        self.epochs_run = 0
        self.best_epoch = -1
        self.best_val = -1.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale_epochs = 0
        self.compute_s = 0.0

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        start = time.perf_counter()
        if self.job.head.dropout > 0:
            # Each head draws dropout masks from its own stream, so its result does not
            # depend on which other heads share the pass (or run in other threads).
            with _TORCH_RNG, torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self.rng_state)
                loss = self._step(x, y)
                self.rng_state = torch.get_rng_state()
        else:  # draws no random numbers: no need to take a turn
            loss = self._step(x, y)
        if not torch.isfinite(loss):
            self.active, self.diverged = False, True
        self.compute_s += time.perf_counter() - start

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def end_epoch(self, epoch: int, val_top1: float | None) -> None:
        self.epochs_run = epoch + 1
        if self.scheduler is not None:
            self.scheduler.step()
        if val_top1 is None:
            self.best_epoch = epoch
            return
        if val_top1 > self.best_val:
            self.best_val, self.best_epoch, self.stale_epochs = val_top1, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.stale_epochs += 1
            if self.job.train.patience is not None and self.stale_epochs >= self.job.train.patience:
                self.active = False


def training_step(job: HeadJob, in_shape: tuple[int, ...], num_classes: int) -> tuple[Callable, nn.Module]:
    """``job``'s real optimiser step on fresh weights (identity standardisation), and its model.

    ``step(x, y)`` with ``x: (B, *in_shape)`` float32, ``y: (B,)`` int64 is one call of what
    :func:`train_heads` runs per minibatch and head, so ``diffprobe plan`` times a head
    without data; the model (in train mode) serves for timing evaluation forwards too.
    """
    head = build_head(job.head, tuple(in_shape), num_classes)
    model = Standardized(head, np.zeros(in_shape, dtype=np.float32), np.ones(in_shape, dtype=np.float32))
    return _HeadRun(job, model).train_step, model


def train_heads(
    source: BatchSource,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    jobs: Sequence[HeadJob],
    *,
    batch_size: int = 32,
    eval_batch_size: int = 512,
    val_fraction: float = 0.1,
    groups: np.ndarray | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    return_models: bool = False,
) -> list[dict]:
    """Train every job's head from one shared stream of minibatches and score it.

    Parameters
    ----------
    source : BatchSource
    train_idx, test_idx : (m,) int
        Disjoint sample positions. A validation set is carved out of ``train_idx``
        (:func:`split_validation`); standardisation statistics come from the rest
        (the fitting set) only.
    jobs : sequence of HeadJob
        All heads see the same minibatches in the same order. Each head starts from
        weights drawn after ``torch.manual_seed(seed)`` and has its own dropout RNG,
        so its result does not depend on the other jobs in the call.
    batch_size, eval_batch_size : int
        Training minibatch size; batch size for statistics, validation and test.
    val_fraction : float in [0, 1)
        0 disables validation (no early stopping; final weights are scored).
    groups : (n,) array, optional
        Validation split by group (e.g. ``image_id``) rather than by sample.
    num_classes : int, optional
        Defaults to ``source.labels.max() + 1``.
    seed : int
        Seeds the validation split, the shuffle and the weights.
    return_models : bool
        Add the trained ``Standardized`` module under ``"model"``.

    Returns
    -------
    One dict per job, in order: ``top1``, ``top5`` (top-min(5, K)) and ``val_top1``
    as fractions in [0, 1] (``val_top1`` NaN without validation), ``best_epoch``
    (0-based), ``epochs_run``, ``train_time_s`` (the head's own compute),
    ``pass_time_s`` (the whole call, shared by the jobs), ``n_train`` (fitting set),
    ``n_val``, ``n_test``, ``n_params``, ``diverged``, ``key``, ``kind``.
    """
    pass_start = time.perf_counter()
    jobs = list(jobs)
    labels = np.asarray(source.labels, dtype=np.int64)
    train_idx, test_idx = _check_inputs(source, labels, train_idx, test_idx, jobs, batch_size, groups)
    if not _is_int(eval_batch_size, minimum=1):
        raise ConfigError(f"eval_batch_size must be an integer >= 1; got {eval_batch_size!r}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    fit_idx, val_idx = split_validation(train_idx, val_fraction, seed, groups)
    keys = sorted({job.key for job in jobs})

    moments = {k: RunningMoments(tuple(source.shapes[k])) for k in keys}
    for x, _ in source.iter_batches(fit_idx, eval_batch_size, keys=keys, shuffle=False, seed=seed, epoch=0):
        for k in keys:
            moments[k].update(x[k])

    runs = []
    for job in jobs:
        with _TORCH_RNG, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = build_head(job.head, source.shapes[job.key], num_classes)
            model = Standardized(head, moments[job.key].mean, moments[job.key].std())
            runs.append(_HeadRun(job, model))

    for epoch in range(max(job.train.epochs for job in jobs)):
        for run in runs:
            run.active = run.active and epoch < run.job.train.epochs
        active = [run for run in runs if run.active]
        if not active:
            break
        active_keys = sorted({run.job.key for run in active})
        for run in active:
            run.model.train()
        for x, y in source.iter_batches(
            fit_idx, batch_size, keys=active_keys, shuffle=True, seed=seed, epoch=epoch
        ):
            xt, yt = _to_tensors(x, y)
            for run in active:
                if run.active:
                    run.train_step(xt[run.job.key], yt)
        active = [run for run in active if run.active]
        val_top1 = [None] * len(active)
        if len(val_idx):
            val_top1 = _evaluate(source, active, val_idx, eval_batch_size, num_classes, seed)[0]
        for run, accuracy in zip(active, val_top1):
            run.end_epoch(epoch, accuracy)

    for run in runs:
        if run.best_state is not None:
            run.model.load_state_dict(run.best_state)
    top1, top5 = _evaluate(source, runs, test_idx, eval_batch_size, num_classes, seed)
    pass_time = time.perf_counter() - pass_start
    results = []
    for i, run in enumerate(runs):
        result = {
            "top1": top1[i],
            "top5": top5[i],
            "val_top1": run.best_val if run.best_state is not None else float("nan"),
            "best_epoch": run.best_epoch,
            "epochs_run": run.epochs_run,
            "train_time_s": run.compute_s,
            "pass_time_s": pass_time,
            "n_train": len(fit_idx),
            "n_val": len(val_idx),
            "n_test": len(test_idx),
            "n_params": count_parameters(run.model),
            "diverged": run.diverged,
            "key": run.job.key,
            "kind": run.job.head.kind,
        }
        if return_models:
            result["model"] = run.model.eval()
        results.append(result)
    return results


def _evaluate(source, runs, indices, batch_size, num_classes, seed) -> tuple[list[float], list[float]]:
    """Top-1 and top-min(5, K) accuracy of each run over ``indices``, in one pass."""
    k = min(5, num_classes)
    correct1 = np.zeros(len(runs), dtype=np.int64)
    correct5 = np.zeros(len(runs), dtype=np.int64)
    keys = sorted({run.job.key for run in runs})
    for run in runs:
        run.model.eval()
    with torch.inference_mode():
        for x, y in source.iter_batches(indices, batch_size, keys=keys, shuffle=False, seed=seed, epoch=0):
            xt, yt = _to_tensors(x, y)
            for i, run in enumerate(runs):
                top = run.model(xt[run.job.key]).topk(k, dim=1).indices
                correct1[i] += int((top[:, 0] == yt).sum())
                correct5[i] += int((top == yt[:, None]).any(dim=1).sum())
    n = max(len(indices), 1)
    return (correct1 / n).tolist(), (correct5 / n).tolist()


def _to_tensors(x, y) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    if not isinstance(x, Mapping):
        x = {DEFAULT_KEY: x}
    xt = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in x.items()}
    return xt, torch.from_numpy(np.asarray(y, dtype=np.int64))


def _check_inputs(source, labels, train_idx, test_idx, jobs, batch_size, groups):
    if not jobs:
        raise ConfigError("train_heads needs at least one HeadJob")
    for job in jobs:
        if not isinstance(job, HeadJob):
            raise ConfigError(f"expected HeadJob entries; got {type(job).__name__}")
        if job.key not in source.shapes:
            raise ConfigError(
                f"head reads feature slice {job.key!r}, which the source lacks; "
                f"valid: {', '.join(map(str, source.shapes))}"
            )
    if not _is_int(batch_size, minimum=1):
        raise ConfigError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    n = len(labels)
    train_idx = np.asarray(train_idx, dtype=np.int64)
    test_idx = np.asarray(test_idx, dtype=np.int64)
    for name, idx in (("train", train_idx), ("test", test_idx)):
        if len(idx) == 0:
            raise ConfigError(f"the {name} split is empty")
        if idx.min() < 0 or idx.max() >= n:
            raise ConfigError(f"{name} indices must lie in [0, {n}); got {idx.min()}..{idx.max()}")
    overlap = np.intersect1d(train_idx, test_idx)
    if len(overlap):
        raise ConfigError(f"train and test splits share {len(overlap)} samples (e.g. {overlap[0]})")
    if groups is not None and len(groups) != n:
        raise ConfigError(f"groups has {len(groups)} entries; expected one per sample ({n})")
    return train_idx, test_idx


def _is_int(value, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= minimum
