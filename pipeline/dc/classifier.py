"""Diffusion Classifier core (Li et al. 2023, arXiv 2303.16203), independent of any model.

The classifier predicts ``argmin_c mean_i loss(eps_i, eps_theta(x_{t_i}, t_i, c))`` with
the same trials ``(t_i, eps_i)`` for every class ``c`` of an image: the shared noise is
the method's variance-reduction trick, since class errors are then compared on
identical inputs. This module holds the pieces that do not need a model:

- ``TrialPlan`` / ``make_plan``: which timesteps are trials, and how each trial's eps is
  drawn (``sample_eps``).
- ``Schedule`` / ``PUBLISHED_SCHEDULES`` / ``stage_trials``: the adaptive elimination
  schedule in the form of the paper's code (``n_samples`` per stage, ``to_keep``
  survivors per stage).
- ``adaptive_classify`` / ``adaptive_classify_batch``: the elimination driver, which
  asks an ``error_fn`` only for the (class, trial) pairs it needs.
- ``denoising_losses`` / ``evaluate_grid``: l2, l1 and huber errors of a denoiser on
  a (class x trial) grid, for the classify stage to wrap into an ``error_fn``.

How trials are keyed
--------------------
A trial is one timestep; a plan's timesteps are distinct and ascending, and trial ``i``
is ``plan.timesteps[i]``. Its eps is a function of ``(plan.seed, sample_key, t)`` only
(``pipeline.noise.sample_noise`` with view 0, see ``EPS_SCHEME``): not of the trial's
position, the schedule, the batch or the device -- and it is the noise extract uses
for view 0 of the same image at the same seed and t. So an exhaustive run, an
adaptive run, and a run over a subset of the timesteps all use the same eps at the
same ``t``, and re-scoring a trial subset from a cached error tensor equals running
with that subset. (The reference code instead
indexes one shared noise tensor by evaluation order, so its eps at a given ``t``
depends on the schedule; the timesteps it evaluates are reproduced exactly here.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, ModelError, did_you_mean
from pipeline.noise import NOISE_SCHEME, q_sample, sample_noise

LOSSES = ("l2", "l1", "huber")
PLAN_MODES = ("even", "random")

#: Recorded in store attributes so that anyone can recompute a trial's eps.
EPS_SCHEME = f"pipeline.noise.sample_noise(seed, str(sample_key), view=0, timestep, shape) [{NOISE_SCHEME}]"


def sample_eps(seed: int, sample_key: int | str, timestep: int, shape: Sequence[int]) -> torch.Tensor:
    """Draw the eps of one trial, identical for every class of the sample.

    Parameters
    ----------
    seed : the plan's noise seed.
    sample_key : the sample's stable identity: its ``image_id`` (or its position).
    timestep : the trial's timestep.
    shape : shape of one sample's input to the denoiser, e.g. ``(4, 64, 64)``.

    Returns
    -------
    (*shape) float32 CPU tensor, a deterministic function of the inputs (``EPS_SCHEME``).
    """
    return sample_noise(int(seed), str(sample_key), 0, int(timestep), shape)


@dataclass(frozen=True)
class TrialPlan:
    """The trials shared by every class of every sample.

    timesteps : distinct ascending timesteps in ``[0, num_train_timesteps)``; trial ``i``
        is ``timesteps[i]``.
    seed : noise seed; trial eps = ``sample_eps(seed, sample_key, timesteps[i], shape)``.
    num_train_timesteps : the scheduler's T.
    mode : how the timesteps were chosen (``even``, ``random`` or ``explicit``), for provenance.
    """

    timesteps: tuple[int, ...]
    seed: int = 0
    num_train_timesteps: int = 1000
    mode: str = "explicit"

    def __post_init__(self):
        ts = tuple(int(t) for t in self.timesteps)
        object.__setattr__(self, "timesteps", ts)
        if not ts:
            raise ConfigError("a trial plan needs at least one timestep")
        if any(b <= a for a, b in zip(ts, ts[1:])):
            raise ConfigError(
                "trial timesteps must be distinct and ascending (eps is keyed by timestep); "
                "sort them and drop duplicates"
            )
        if ts[0] < 0 or ts[-1] >= self.num_train_timesteps:
            raise ConfigError(
                f"trial timesteps must lie in [0, {self.num_train_timesteps}); got {ts[0]} .. {ts[-1]}"
            )

    @property
    def n_trials(self) -> int:
        return len(self.timesteps)

    def eps(self, sample_key: int | str, trial: int, shape: Sequence[int]) -> torch.Tensor:
        """The (*shape) float32 CPU eps of ``trial`` for ``sample_key``."""
        return sample_eps(self.seed, sample_key, self.timesteps[trial], shape)

    def subset(self, trials: Sequence[int]) -> TrialPlan:
        """The plan restricted to trial indices ``trials`` (same eps at the same timesteps)."""
        return TrialPlan(tuple(self.timesteps[i] for i in sorted(trials)), self.seed,
                         self.num_train_timesteps, "explicit")

    def to_dict(self) -> dict:
        """JSON-able form for store attributes (includes ``EPS_SCHEME``)."""
        return {"timesteps": list(self.timesteps), "seed": self.seed,
                "num_train_timesteps": self.num_train_timesteps, "mode": self.mode,
                "eps_scheme": EPS_SCHEME}

    @classmethod
    def from_dict(cls, data: Mapping) -> TrialPlan:
        return cls(tuple(data["timesteps"]), int(data["seed"]), int(data["num_train_timesteps"]),
                   str(data.get("mode", "explicit")))


def even_timesteps(n: int, num_train_timesteps: int = 1000) -> list[int]:
    """``n`` evenly spaced timesteps as the reference code spaces them.

    ``t_k = T // n // 2 + k * (T // n)`` for ``k < n``: centred in ``n`` equal bins when
    ``n`` divides ``T``; otherwise the bins have width ``T // n`` and the last
    ``T - n * (T // n)`` steps are never used (the reference's behaviour, kept).
    """
    _check_n_trials(n, num_train_timesteps)
    step = num_train_timesteps // n
    return [step // 2 + k * step for k in range(n)]


def _check_n_trials(n: int, num_train_timesteps: int) -> None:
    if not 1 <= n <= num_train_timesteps:
        raise ConfigError(f"n_trials must be between 1 and num_train_timesteps={num_train_timesteps}; "
                          f"got {n}")


def make_plan(n_trials: int, num_train_timesteps: int = 1000, mode: str = "even", seed: int = 0) -> TrialPlan:
    """Build a plan of ``n_trials`` timesteps.

    mode ``even``: ``even_timesteps`` (the paper's choice). Mode ``random``: ``n_trials``
    distinct timesteps drawn uniformly from ``[0, T)`` with ``seed``, sorted. For an
    adaptive schedule use ``n_trials = max(n_samples)``: the reference code builds its
    grid that way and every stage picks its timesteps from it.
    """
    if mode not in PLAN_MODES:
        raise ConfigError(f"unknown trial plan mode {mode!r}{did_you_mean(mode, PLAN_MODES)}; "
                          f"valid: {', '.join(PLAN_MODES)}")
    if mode == "even":
        timesteps = even_timesteps(n_trials, num_train_timesteps)
    else:
        _check_n_trials(n_trials, num_train_timesteps)
        rng = np.random.default_rng(seed)
        timesteps = sorted(rng.choice(num_train_timesteps, size=n_trials, replace=False).tolist())
    return TrialPlan(tuple(timesteps), seed, num_train_timesteps, mode)


@dataclass(frozen=True)
class Schedule:
    """Adaptive elimination in the paper's code form.

    n_samples : trials (timesteps) each stage's class scores rest on, strictly increasing.
    to_keep : classes that survive each stage, non-increasing, ending at 1.
    """

    n_samples: tuple[int, ...]
    to_keep: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "n_samples", tuple(int(n) for n in self.n_samples))
        object.__setattr__(self, "to_keep", tuple(int(k) for k in self.to_keep))

    @classmethod
    def exhaustive(cls, n_trials: int) -> Schedule:
        """One stage: every class on every trial."""
        return cls((n_trials,), (1,))

    def validate(self, n_classes: int, n_trials: int) -> None:
        """Raise ``ConfigError`` naming the fix if the schedule cannot run on this plan."""
        ns, keep = self.n_samples, self.to_keep
        if not ns or len(ns) != len(keep):
            raise ConfigError(f"n_samples {list(ns)} and to_keep {list(keep)} must be non-empty lists of "
                              "the same length (one entry per stage)")
        if min(ns) < 1 or min(keep) < 1:
            raise ConfigError(f"n_samples {list(ns)} and to_keep {list(keep)} must be positive")
        if any(b <= a for a, b in zip(ns, ns[1:])):
            raise ConfigError(f"n_samples {list(ns)} must increase from stage to stage, e.g. [50, 500]")
        if any(b > a for a, b in zip(keep, keep[1:])):
            raise ConfigError(f"to_keep {list(keep)} must not increase from stage to stage, e.g. [5, 1]")
        if keep[-1] != 1:
            raise ConfigError(f"to_keep {list(keep)} must end with 1 so the last stage leaves one class")
        if keep[0] > n_classes:
            raise ConfigError(f"to_keep[0]={keep[0]} exceeds the {n_classes} classes; "
                              f"lower it to at most {n_classes}")
        if ns[-1] > n_trials:
            raise ConfigError(f"n_samples[-1]={ns[-1]} exceeds the plan's {n_trials} trials; "
                              f"make the plan with n_trials={ns[-1]} (max of n_samples)")


#: The schedules Li et al. published, per dataset, copied as they are.
PUBLISHED_SCHEDULES: dict[str, Schedule] = {
    "cifar10": Schedule((50, 500), (5, 1)),
    "pets": Schedule((25, 250), (5, 1)),
    "stl10": Schedule((100, 500), (5, 1)),
    "food": Schedule((20, 50, 100, 500), (20, 10, 5, 1)),
    "aircraft": Schedule((20, 50, 100, 500), (20, 10, 5, 1)),
    "flowers": Schedule((20, 50, 100, 500), (20, 10, 5, 1)),
    "imagenet": Schedule((50, 100, 500, 1000), (500, 50, 10, 1)),
}


def stage_trials(n_trials: int, n_samples: Sequence[int]) -> list[list[int]]:
    """The trial indices each stage newly evaluates, as the reference code picks them.

    The plan's ``n_trials`` timesteps are the grid. Stage ``s`` with ``N = n_samples[s]``
    takes every ``stride = n_trials // N``-th grid entry from ``stride // 2``, first ``N``
    of them, and evaluates those not evaluated by an earlier stage. A stage's set is
    evenly spaced over the grid, but it need not contain the earlier stages' trials:
    for ``[50, 500]`` on a 500-trial grid it does (stage 2 adds 450), while for the
    ImageNet schedule stage 2 (odd grid positions 5, 15, ...) shares none of stage 1's.
    Class scores always average every trial evaluated so far (as the reference does).
    """
    evaluated: set[int] = set()
    stages = []
    for n in n_samples:
        stride = n_trials // n
        wanted = list(range(stride // 2, n_trials, stride))[:n]
        new = [i for i in wanted if i not in evaluated]
        evaluated.update(new)
        stages.append(new)
    return stages


@dataclass(frozen=True)
class AdaptiveResult:
    """One sample's elimination.

    prediction : the surviving class.
    errors : loss name -> (n_classes, n_trials) float64, NaN where a class was
        eliminated before that trial (or the trial is in no stage).
    forward_passes : (class, trial) pairs evaluated, one denoiser forward each.
    survivors : classes alive after each stage, ascending.
    """

    prediction: int
    errors: dict[str, np.ndarray]
    forward_passes: int
    survivors: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class StageRequest:
    """Errors wanted for one sample: every class of ``class_ids`` on every trial of ``trial_ids``."""

    item: int
    class_ids: tuple[int, ...]
    trial_ids: tuple[int, ...]


ErrorGrid = np.ndarray | Mapping[str, np.ndarray]


def adaptive_classify(
    error_fn: Callable[[list[int], list[int]], ErrorGrid],
    n_classes: int,
    n_samples: Sequence[int],
    to_keep: Sequence[int],
    *,
    n_trials: int | None = None,
    loss: str = "l2",
) -> AdaptiveResult:
    """Classify one sample by staged elimination.

    Parameters
    ----------
    error_fn : ``error_fn(class_ids, trial_ids)`` returns a ``(len(class_ids),
        len(trial_ids))`` array of errors, or a dict of such arrays, one per loss.
        It is called once per stage, only for still-alive classes and new trials.
    n_classes : number of classes.
    n_samples, to_keep : the schedule (see ``Schedule``); ``[n_trials]``/``[1]`` is exhaustive.
    n_trials : trials in the plan; defaults to ``max(n_samples)``.
    loss : which loss drives elimination when ``error_fn`` returns a dict; the name
        the errors are stored under when it returns an array.
    """

    def batch_fn(requests: list[StageRequest]) -> list[ErrorGrid]:
        return [error_fn(list(r.class_ids), list(r.trial_ids)) for r in requests]

    results = adaptive_classify_batch(batch_fn, 1, n_classes, n_samples, to_keep,
                                      n_trials=n_trials, loss=loss)
    return results[0]


def adaptive_classify_batch(
    error_fn: Callable[[list[StageRequest]], list[ErrorGrid]],
    n_items: int,
    n_classes: int,
    n_samples: Sequence[int],
    to_keep: Sequence[int],
    *,
    n_trials: int | None = None,
    loss: str = "l2",
) -> list[AdaptiveResult]:
    """``adaptive_classify`` for ``n_items`` samples at once.

    ``error_fn(requests)`` gets every sample's request of a stage in one call (so the
    caller can fill a device batch across samples) and returns one error grid per
    request, in order. Each sample's elimination is independent of the others'.
    """
    schedule = Schedule(tuple(n_samples), tuple(to_keep))
    n_trials = max(schedule.n_samples) if n_trials is None else int(n_trials)
    schedule.validate(n_classes, n_trials)
    stages = stage_trials(n_trials, schedule.n_samples)

    errors: list[dict[str, np.ndarray]] = [{} for _ in range(n_items)]
    alive = [list(range(n_classes)) for _ in range(n_items)]
    survivors: list[list[tuple[int, ...]]] = [[] for _ in range(n_items)]
    passes = [0] * n_items
    evaluated: list[int] = []
    for new_trials, keep in zip(stages, schedule.to_keep):
        if new_trials:
            requests = [StageRequest(i, tuple(alive[i]), tuple(new_trials)) for i in range(n_items)]
            grids = error_fn(requests)
            if len(grids) != n_items:
                raise ValueError(f"error_fn returned {len(grids)} grids for {n_items} requests")
            for request, grid in zip(requests, grids):
                _record(errors[request.item], grid, request, n_classes, n_trials, loss)
                passes[request.item] += len(request.class_ids) * len(new_trials)
            evaluated += new_trials
        for i in range(n_items):
            mean = errors[i][loss][np.ix_(alive[i], evaluated)].mean(axis=1)
            # stable sort: ties keep the lowest class index
            alive[i] = sorted(alive[i][j] for j in np.argsort(mean, kind="stable")[:keep])
            survivors[i].append(tuple(alive[i]))
    return [AdaptiveResult(alive[i][0], errors[i], passes[i], tuple(survivors[i])) for i in range(n_items)]


def _record(store: dict[str, np.ndarray], grid: ErrorGrid, request: StageRequest,
            n_classes: int, n_trials: int, loss: str) -> None:
    grids = dict(grid) if isinstance(grid, Mapping) else {loss: grid}
    if loss not in grids:
        raise ConfigError(f"loss {loss!r} is not among the computed losses {sorted(grids)}; "
                          f"choose one of them")
    shape = (len(request.class_ids), len(request.trial_ids))
    for name, values in grids.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != shape:
            raise ValueError(f"error_fn returned {name!r} errors of shape {values.shape}, expected {shape}")
        if not np.isfinite(values).all():
            c, t = np.argwhere(~np.isfinite(values))[0]
            raise ModelError(
                f"{name} error is not finite for sample {request.item}, class {request.class_ids[c]}, "
                f"trial {request.trial_ids[t]}; run the denoiser in float32"
            )
        if name not in store:
            store[name] = np.full((n_classes, n_trials), np.nan)
        store[name][np.ix_(request.class_ids, request.trial_ids)] = values


def denoising_losses(eps: torch.Tensor, eps_pred: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row l2 (mean squared), l1 (mean absolute) and huber (delta 1, mean) errors.

    eps, eps_pred : (B, ...) tensors. Returns loss name -> (B,) float32, averaged over
    all non-batch dimensions, computed in float32 whatever the inputs' dtype.
    """
    eps, eps_pred = eps.float(), eps_pred.float()
    dims = tuple(range(1, eps.ndim))
    return {
        "l2": F.mse_loss(eps_pred, eps, reduction="none").mean(dim=dims),
        "l1": F.l1_loss(eps_pred, eps, reduction="none").mean(dim=dims),
        "huber": F.huber_loss(eps_pred, eps, reduction="none", delta=1.0).mean(dim=dims),
    }


def evaluate_grid(
    denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    plan: TrialPlan,
    sample_key: int | str,
    class_ids: Sequence[int],
    trial_ids: Sequence[int],
    alphas_cumprod: torch.Tensor | np.ndarray,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Denoising errors of one sample for every class on every trial.

    Parameters
    ----------
    denoise : ``denoise(x_t (B, *shape), t (B,) int64, class_ids (B,) int64) -> eps_pred (B, *shape)``,
        all on ``x0.device``; conditioning by class happens inside it.
    x0 : (*shape) clean input (image, or latent already scaled), on the model's device and dtype.
    plan, sample_key : where each trial's timestep and eps come from.
    alphas_cumprod : (T,) the scheduler's cumulative alphas.
    batch_size : denoiser batch size; pairs run trial-major, so each eps is drawn once per batch.

    Returns
    -------
    loss name -> (len(class_ids), len(trial_ids)) float64 errors.
    """
    device, dtype = x0.device, x0.dtype
    alphas = torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float64)
    pairs = [(ti, ci) for ti in range(len(trial_ids)) for ci in range(len(class_ids))]
    out = {name: np.empty((len(class_ids), len(trial_ids))) for name in LOSSES}
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        noisy, eps = {}, {}
        for ti in dict.fromkeys(ti for ti, _ in batch):
            t = torch.tensor([plan.timesteps[trial_ids[ti]]])
            eps[ti] = plan.eps(sample_key, trial_ids[ti], x0.shape).to(device)
            noisy[ti] = q_sample(x0[None], eps[ti][None], alphas, t)[0].to(dtype)
        x_t = torch.stack([noisy[ti] for ti, _ in batch])
        t_in = torch.tensor([plan.timesteps[trial_ids[ti]] for ti, _ in batch], device=device)
        c_in = torch.tensor([class_ids[ci] for _, ci in batch], device=device)
        with torch.inference_mode():
            eps_pred = denoise(x_t, t_in, c_in)
        losses = denoising_losses(torch.stack([eps[ti] for ti, _ in batch]), eps_pred)
        for name, values in losses.items():
            for (ti, ci), v in zip(batch, values.cpu().tolist()):
                out[name][ci, ti] = v
    return out
