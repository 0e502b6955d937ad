"""Diffusion Classifier core (Li et al. 2023, arXiv 2303.16203), independent of any model.

The classifier predicts ``argmin_c mean_i loss(eps_i, eps_theta(x_{t_i}, t_i, c))`` with
the same trials ``(t_i, eps_i)`` for every candidate ``c`` of an image: the shared noise
is the method's variance-reduction trick, since errors are then compared on identical
inputs. A *candidate* is one conditioning the model is asked about: a class label, or
one prompt (a prompt set may give a class several prompts; see ``pipeline.dc.prompts``).
This module holds the pieces that do not need a model:

- ``TrialPlan`` / ``make_plan``: the timestep grid, the noise draws per timestep, and
  how each trial's eps is drawn (``sample_eps``).
- ``Schedule`` / ``PUBLISHED_SCHEDULES`` / ``round_timesteps``: adaptive elimination in
  rounds, as the paper's code does it.
- ``adaptive_classify`` / ``adaptive_classify_batch``: the elimination driver, which
  asks an ``error_fn`` only for the (candidate, trial) pairs it needs.
- ``denoising_losses``: l2, l1 and huber errors, for the classify stage's ``error_fn``.

Names, and the reference code's names for the same things
---------------------------------------------------------
- ``n_timesteps``: timesteps in the grid (the reference: ``max(n_samples)``).
- ``noise_draws``: noise draws per timestep (the reference: ``n_trials``; 1 in every
  published command).
- trial: one (timestep, draw) pair, so a plan has ``n_timesteps * noise_draws`` trials,
  timestep-major (trial ``i`` is grid timestep ``i // noise_draws``, draw ``i % noise_draws``).
- round: one step of elimination (the reference's loop over ``zip(n_samples, to_keep)``).
- ``timesteps_per_round`` / ``keep_per_round``: the reference's ``n_samples`` / ``to_keep``.

How trials are keyed
--------------------
A trial's eps is a function of ``(plan.seed, sample_key, t, draw)`` only
(``pipeline.noise.sample_noise`` with ``view = draw``, see ``EPS_SCHEME``): not of the
trial's position, the schedule, the batch or the device -- and draw ``d`` is the noise
extract uses for view ``d`` of the same image at the same seed and t. So an exhaustive
run, an adaptive run, and a run over a subset of the timesteps or draws all use the
same eps at the same ``(t, draw)``, and re-scoring a trial subset from a cached error
tensor equals running with that subset. (The reference code instead indexes one
shared noise tensor by evaluation order, so its eps at a given ``t`` depends on the
schedule; the timesteps it evaluates are reproduced exactly here.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, ModelError, did_you_mean
from pipeline.noise import NOISE_SCHEME, sample_noise

LOSSES = ("l2", "l1", "huber")
SPACINGS = ("even", "random")

#: Recorded in store attributes so that anyone can recompute a trial's eps.
EPS_SCHEME = (f"pipeline.noise.sample_noise(seed, str(sample_key), view=draw, timestep, shape) "
              f"[{NOISE_SCHEME}]")


def sample_eps(seed: int, sample_key: int | str, timestep: int, shape: Sequence[int], draw: int = 0
               ) -> torch.Tensor:
    """Draw the eps of one trial, identical for every candidate of the sample.

    Parameters
    ----------
    seed : the plan's noise seed.
    sample_key : the sample's stable identity: its ``image_id`` (or its position).
    timestep : the trial's timestep.
    shape : shape of one sample's input to the denoiser, e.g. ``(4, 64, 64)``.
    draw : which noise draw at this timestep (0-based).

    Returns
    -------
    (*shape) float32 CPU tensor, a deterministic function of the inputs (``EPS_SCHEME``).
    """
    return sample_noise(int(seed), str(sample_key), int(draw), int(timestep), shape)


@dataclass(frozen=True)
class TrialPlan:
    """The trials shared by every candidate of every sample.

    timesteps : the grid: distinct ascending timesteps in ``[0, num_train_timesteps)``.
    seed : noise seed; see ``eps``.
    num_train_timesteps : the scheduler's T.
    spacing : how the grid was chosen (``even``, ``random`` or ``explicit``), for provenance.
    noise_draws : noise draws per timestep; trial ``i`` is timestep ``timesteps[i //
        noise_draws]`` with draw ``i % noise_draws``.
    """

    timesteps: tuple[int, ...]
    seed: int = 0
    num_train_timesteps: int = 1000
    spacing: str = "explicit"
    noise_draws: int = 1

    def __post_init__(self):
        ts = tuple(int(t) for t in self.timesteps)
        object.__setattr__(self, "timesteps", ts)
        if not ts:
            raise ConfigError("a trial plan needs at least one timestep")
        if any(b <= a for a, b in zip(ts, ts[1:])):
            raise ConfigError(
                "trial timesteps must be distinct and ascending (eps is keyed by timestep); "
                "sort them and drop duplicates (use noise_draws for several draws per timestep)"
            )
        if ts[0] < 0 or ts[-1] >= self.num_train_timesteps:
            raise ConfigError(
                f"trial timesteps must lie in [0, {self.num_train_timesteps}); got {ts[0]} .. {ts[-1]}"
            )
        if int(self.noise_draws) < 1:
            raise ConfigError(f"noise_draws must be >= 1, got {self.noise_draws}")

    @property
    def n_timesteps(self) -> int:
        return len(self.timesteps)

    @property
    def n_trials(self) -> int:
        return len(self.timesteps) * self.noise_draws

    @property
    def trial_timesteps(self) -> tuple[int, ...]:
        """(n_trials,) the timestep of each trial."""
        return tuple(t for t in self.timesteps for _ in range(self.noise_draws))

    @property
    def trial_draws(self) -> tuple[int, ...]:
        """(n_trials,) the noise draw of each trial."""
        return tuple(range(self.noise_draws)) * len(self.timesteps)

    def trials_of(self, grid_positions: Sequence[int]) -> list[int]:
        """Trial indices of every draw at the grid positions ``grid_positions``, in order."""
        d = self.noise_draws
        return [k * d + j for k in grid_positions for j in range(d)]

    def eps(self, sample_key: int | str, trial: int, shape: Sequence[int]) -> torch.Tensor:
        """The (*shape) float32 CPU eps of ``trial`` for ``sample_key``."""
        return sample_eps(self.seed, sample_key, self.timesteps[trial // self.noise_draws], shape,
                          trial % self.noise_draws)

    def subset(self, grid_positions: Sequence[int]) -> TrialPlan:
        """The plan on the grid timesteps at ``grid_positions`` (same eps at the same (t, draw))."""
        return TrialPlan(tuple(self.timesteps[i] for i in sorted(grid_positions)), self.seed,
                         self.num_train_timesteps, "explicit", self.noise_draws)

    def to_dict(self) -> dict:
        """JSON-able form for store attributes (includes ``EPS_SCHEME``)."""
        return {"timesteps": list(self.timesteps), "noise_draws": self.noise_draws, "seed": self.seed,
                "num_train_timesteps": self.num_train_timesteps, "spacing": self.spacing,
                "eps_scheme": EPS_SCHEME}

    @classmethod
    def from_dict(cls, data: Mapping) -> TrialPlan:
        return cls(tuple(data["timesteps"]), int(data["seed"]), int(data["num_train_timesteps"]),
                   str(data.get("spacing", "explicit")), int(data.get("noise_draws", 1)))


def even_timesteps(n: int, num_train_timesteps: int = 1000) -> list[int]:
    """``n`` evenly spaced timesteps as the reference code spaces them.

    ``t_k = T // n // 2 + k * (T // n)`` for ``k < n``: centred in ``n`` equal bins when
    ``n`` divides ``T``; otherwise the bins have width ``T // n`` and the last
    ``T - n * (T // n)`` steps are never used (the reference's behaviour, kept).
    """
    _check_n_timesteps(n, num_train_timesteps)
    step = num_train_timesteps // n
    return [step // 2 + k * step for k in range(n)]


def _check_n_timesteps(n: int, num_train_timesteps: int) -> None:
    if not 1 <= n <= num_train_timesteps:
        raise ConfigError(f"n_timesteps must be between 1 and num_train_timesteps={num_train_timesteps}; "
                          f"got {n}")


def make_plan(n_timesteps: int, num_train_timesteps: int = 1000, spacing: str = "even", seed: int = 0,
              noise_draws: int = 1) -> TrialPlan:
    """Build a plan on a grid of ``n_timesteps`` timesteps with ``noise_draws`` draws each.

    spacing ``even``: ``even_timesteps`` (the paper's choice). ``random``: ``n_timesteps``
    distinct timesteps drawn uniformly from ``[0, T)`` with ``seed``, sorted. For an
    adaptive schedule the grid has ``max(timesteps_per_round)`` timesteps, as in the
    reference code; every round picks its timesteps from it (``round_timesteps``).
    """
    if spacing not in SPACINGS:
        raise ConfigError(f"unknown timestep spacing {spacing!r}{did_you_mean(spacing, SPACINGS)}; "
                          f"valid: {', '.join(SPACINGS)}")
    if spacing == "even":
        timesteps = even_timesteps(n_timesteps, num_train_timesteps)
    else:
        _check_n_timesteps(n_timesteps, num_train_timesteps)
        rng = np.random.default_rng(seed)
        timesteps = sorted(rng.choice(num_train_timesteps, size=n_timesteps, replace=False).tolist())
    return TrialPlan(tuple(timesteps), seed, num_train_timesteps, spacing, noise_draws)


@dataclass(frozen=True)
class Schedule:
    """Adaptive elimination in rounds, in the paper's code form.

    timesteps_per_round : grid timesteps each round's scores rest on, strictly
        increasing; the last is the grid size (the reference's ``n_samples``).
    keep_per_round : candidates that survive each round, non-increasing, ending at 1
        (the reference's ``to_keep``).
    """

    timesteps_per_round: tuple[int, ...]
    keep_per_round: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "timesteps_per_round", tuple(int(n) for n in self.timesteps_per_round))
        object.__setattr__(self, "keep_per_round", tuple(int(k) for k in self.keep_per_round))

    @classmethod
    def exhaustive(cls, n_timesteps: int) -> Schedule:
        """One round: every candidate on every trial."""
        return cls((n_timesteps,), (1,))

    @property
    def grid_size(self) -> int:
        """The grid the rounds choose from: ``max(timesteps_per_round)``, as the reference builds it."""
        return max(self.timesteps_per_round)

    def validate(self, n_candidates: int, n_timesteps: int) -> None:
        """Raise ``ConfigError`` naming the fix if the schedule cannot run on this grid."""
        ns, keep = self.timesteps_per_round, self.keep_per_round
        both = f"timesteps_per_round {list(ns)} and keep_per_round {list(keep)}"
        if not ns or len(ns) != len(keep):
            raise ConfigError(f"{both} must be non-empty lists of the same length (one entry per round)")
        if min(ns) < 1 or min(keep) < 1:
            raise ConfigError(f"{both} must be positive")
        if any(b <= a for a, b in zip(ns, ns[1:])):
            raise ConfigError(f"timesteps_per_round {list(ns)} must increase from round to round, "
                              "e.g. [50, 500]")
        if any(b > a for a, b in zip(keep, keep[1:])):
            raise ConfigError(f"keep_per_round {list(keep)} must not increase from round to round, "
                              "e.g. [5, 1]")
        if keep[-1] != 1:
            raise ConfigError(f"keep_per_round {list(keep)} must end with 1 so the last round leaves "
                              "one candidate")
        if keep[0] > n_candidates:
            raise ConfigError(f"keep_per_round[0]={keep[0]} exceeds the {n_candidates} candidates; "
                              f"lower it to at most {n_candidates}")
        if ns[-1] != n_timesteps:
            raise ConfigError(
                f"timesteps_per_round[-1]={ns[-1]} but the grid has {n_timesteps} timesteps; the last round "
                f"evaluates the whole grid (as in the reference code): use a grid of {ns[-1]} timesteps")


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


def round_timesteps(n_timesteps: int, timesteps_per_round: Sequence[int]) -> list[list[int]]:
    """The grid positions each round newly evaluates, as the reference code picks them.

    Round ``r`` with ``N = timesteps_per_round[r]`` takes every ``stride = n_timesteps // N``-th
    grid entry from ``stride // 2``, first ``N`` of them, and evaluates those not
    evaluated by an earlier round. A round's set is evenly spaced over the grid, but it
    need not contain the earlier rounds' timesteps: for ``[50, 500]`` on a 500-step grid
    it does (round 2 adds 450), while for the ImageNet schedule round 2 (odd grid
    positions 5, 15, ...) shares none of round 1's. Scores always average every trial
    evaluated so far (as the reference does).
    """
    evaluated: set[int] = set()
    rounds = []
    for n in timesteps_per_round:
        stride = n_timesteps // n
        wanted = list(range(stride // 2, n_timesteps, stride))[:n]
        new = [i for i in wanted if i not in evaluated]
        evaluated.update(new)
        rounds.append(new)
    return rounds


def round_trials(plan: TrialPlan, schedule: Schedule) -> list[list[int]]:
    """The trial indices each round newly evaluates: every draw of ``round_timesteps``."""
    return [plan.trials_of(r) for r in round_timesteps(plan.n_timesteps, schedule.timesteps_per_round)]


def passes_per_sample(plan: TrialPlan, schedule: Schedule, n_candidates: int) -> int:
    """Denoiser forwards one sample costs under ``schedule``."""
    alive, total = n_candidates, 0
    for new, keep in zip(round_trials(plan, schedule), schedule.keep_per_round):
        total += alive * len(new)
        alive = keep
    return total


@dataclass(frozen=True)
class AdaptiveResult:
    """One sample's elimination.

    winner : the surviving candidate.
    errors : loss name -> (n_candidates, n_trials) float64, NaN where a candidate was
        eliminated before that trial (or the trial is in no round).
    forward_passes : (candidate, trial) pairs evaluated, one denoiser forward each.
    survivors : candidates alive after each round, ascending.
    """

    winner: int
    errors: dict[str, np.ndarray]
    forward_passes: int
    survivors: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class RoundRequest:
    """Errors wanted for one sample: every candidate of ``candidate_ids`` on every trial of ``trial_ids``."""

    item: int
    candidate_ids: tuple[int, ...]
    trial_ids: tuple[int, ...]


ErrorGrid = np.ndarray | Mapping[str, np.ndarray]


def adaptive_classify(
    error_fn: Callable[[list[int], list[int]], ErrorGrid],
    n_candidates: int,
    plan: TrialPlan,
    schedule: Schedule | None = None,
    *,
    loss: str = "l2",
) -> AdaptiveResult:
    """Classify one sample by elimination in rounds.

    Parameters
    ----------
    error_fn : ``error_fn(candidate_ids, trial_ids)`` returns a ``(len(candidate_ids),
        len(trial_ids))`` array of errors, or a dict of such arrays, one per loss.
        It is called once per round, only for still-alive candidates and new trials.
    n_candidates : number of candidates (classes, or prompts).
    plan : the trials (grid and draws).
    schedule : the rounds; ``None`` is exhaustive.
    loss : which loss drives elimination when ``error_fn`` returns a dict; the name
        the errors are stored under when it returns an array.
    """

    def batch_fn(requests: list[RoundRequest]) -> list[ErrorGrid]:
        return [error_fn(list(r.candidate_ids), list(r.trial_ids)) for r in requests]

    return adaptive_classify_batch(batch_fn, 1, n_candidates, plan, schedule, loss=loss)[0]


def adaptive_classify_batch(
    error_fn: Callable[[list[RoundRequest]], list[ErrorGrid]],
    n_items: int,
    n_candidates: int,
    plan: TrialPlan,
    schedule: Schedule | None = None,
    *,
    loss: str = "l2",
) -> list[AdaptiveResult]:
    """``adaptive_classify`` for ``n_items`` samples at once.

    ``error_fn(requests)`` gets every sample's request of a round in one call (so the
    caller can fill a device batch across samples) and returns one error grid per
    request, in order. Each sample's elimination is independent of the others'. After
    each round the ``keep`` candidates with the lowest mean over every trial evaluated
    so far survive (ties: the lowest candidate index).
    """
    schedule = schedule or Schedule.exhaustive(plan.n_timesteps)
    schedule.validate(n_candidates, plan.n_timesteps)
    n_trials = plan.n_trials
    errors: list[dict[str, np.ndarray]] = [{} for _ in range(n_items)]
    alive = [list(range(n_candidates)) for _ in range(n_items)]
    survivors: list[list[tuple[int, ...]]] = [[] for _ in range(n_items)]
    passes = [0] * n_items
    evaluated: list[int] = []
    for new_trials, keep in zip(round_trials(plan, schedule), schedule.keep_per_round):
        if new_trials:
            requests = [RoundRequest(i, tuple(alive[i]), tuple(new_trials)) for i in range(n_items)]
            grids = error_fn(requests)
            if len(grids) != n_items:
                raise ValueError(f"error_fn returned {len(grids)} grids for {n_items} requests")
            for request, grid in zip(requests, grids):
                _record(errors[request.item], grid, request, n_candidates, n_trials, loss)
                passes[request.item] += len(request.candidate_ids) * len(new_trials)
            evaluated += new_trials
        for i in range(n_items):
            mean = errors[i][loss][np.ix_(alive[i], evaluated)].mean(axis=1)
            # stable sort: ties keep the lowest candidate index
            alive[i] = sorted(alive[i][j] for j in np.argsort(mean, kind="stable")[:keep])
            survivors[i].append(tuple(alive[i]))
    return [AdaptiveResult(alive[i][0], errors[i], passes[i], tuple(survivors[i])) for i in range(n_items)]


def _record(store: dict[str, np.ndarray], grid: ErrorGrid, request: RoundRequest,
            n_candidates: int, n_trials: int, loss: str) -> None:
    grids = dict(grid) if isinstance(grid, Mapping) else {loss: grid}
    if loss not in grids:
        raise ConfigError(f"loss {loss!r} is not among the computed losses {sorted(grids)}; "
                          f"choose one of them")
    shape = (len(request.candidate_ids), len(request.trial_ids))
    for name, values in grids.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != shape:
            raise ValueError(f"error_fn returned {name!r} errors of shape {values.shape}, expected {shape}")
        if not np.isfinite(values).all():
            c, t = np.argwhere(~np.isfinite(values))[0]
            raise ModelError(
                f"{name} error is not finite for sample {request.item}, "
                f"candidate {request.candidate_ids[c]}, trial {request.trial_ids[t]}; "
                "run the denoiser in float32"
            )
        if name not in store:
            store[name] = np.full((n_candidates, n_trials), np.nan)
        store[name][np.ix_(request.candidate_ids, request.trial_ids)] = values


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
