"""Scoring the Diffusion Classifier from a cached error tensor, with no model.

The classify stage stores ``errors`` of shape ``(n_samples, n_candidates, n_trials)``:
the denoising error of each candidate (a class label, or one prompt of a class) on
each trial, NaN where adaptive elimination never evaluated the candidate at that
trial; ``candidate_class`` (n_candidates,) says which class each candidate stands
for. Everything here is numpy (and matplotlib for the confusion PNG), so any
re-scoring -- another trial subset, another weighting -- runs on a CPU.

Ranking rule
------------
Over the selected trials, a candidate's *coverage* is the number of trials with a
finite error and its *score* the (weighted) mean of those errors. Candidates rank by
coverage, highest first, then by score, lowest first, then by index; a class ranks
where its best candidate does (so with several prompts per class, a class scores as
its best prompt: the minimum error over its prompts, as in the reference code, where
the winning prompt row maps to its class). On an exhaustive tensor every candidate
has full coverage and this is the plain ``argmin`` of the mean error. On an adaptive
tensor it puts each candidate at the round it reached: scoring all trials reproduces
the adaptive run's prediction (the last round's candidates have the most trials, and
the last elimination compares their means), and candidates never evaluated on the
selected trials rank last. Means over different trial sets are compared only where
coverage ties: they are not comparable, since the error depends strongly on the
timestep. (A plain nanmean argmin can pick a candidate eliminated early whose few
trials happened to be easy.)

The subtlety of re-scoring an adaptive run with a trial subset: only candidates
evaluated at all of the subset's trials compete on their mean; which ones those are
was decided by the elimination, on the trials of earlier rounds. The first round's
trials were evaluated for every candidate, so a subset of them is an honest
exhaustive re-scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, did_you_mean

WEIGHTINGS = ("uniform", "snr", "x0", "elbo")


def _select(errors: np.ndarray, trials: Sequence[int] | None) -> np.ndarray:
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 3:
        raise ValueError(f"errors must be (n_samples, n_candidates, n_trials); got shape {errors.shape}")
    if trials is None:
        return errors
    trials = np.asarray(trials, dtype=np.int64).reshape(-1)
    n_trials = errors.shape[2]
    if trials.size == 0:
        raise ConfigError("the trial subset is empty; select at least one trial")
    if trials.min() < -n_trials or trials.max() >= n_trials:
        raise ConfigError(f"trial indices must lie in [0, {n_trials}); got {trials.min()} .. {trials.max()}")
    return errors[:, :, trials]


def _weights(weighting: str | Sequence[float] | np.ndarray, n_trials: int,
             trials: Sequence[int] | None) -> np.ndarray:
    if isinstance(weighting, str):
        if weighting != "uniform":
            raise ConfigError(
                f"weighting {weighting!r} needs the plan's timesteps; pass "
                f"timestep_weights(timesteps, {weighting!r}, alphas_cumprod) as weighting"
                if weighting in WEIGHTINGS else
                f"unknown weighting {weighting!r}{did_you_mean(weighting, WEIGHTINGS)}; "
                "use 'uniform' or an array of per-trial weights"
            )
        return np.ones(n_trials if trials is None else len(np.asarray(trials).reshape(-1)))
    weights = np.asarray(weighting, dtype=np.float64).reshape(-1)
    if weights.shape[0] != n_trials:
        raise ConfigError(f"weighting has {weights.shape[0]} entries; give one weight per trial ({n_trials})")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ConfigError("trial weights must be finite and non-negative")
    return weights if trials is None else weights[np.asarray(trials).reshape(-1)]


def candidate_scores(errors: np.ndarray, trials: Sequence[int] | None = None,
                     weighting: str | Sequence[float] | np.ndarray = "uniform"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per-candidate score and coverage over the selected trials.

    Parameters
    ----------
    errors : (n_samples, n_candidates, n_trials) float, NaN where not evaluated.
    trials : trial indices to use (``select_trials`` maps timesteps and draws to them); all if None.
    weighting : ``"uniform"`` or (n_trials,) non-negative weights over *all* trials of
        the tensor (``timestep_weights`` builds them).

    Returns
    -------
    scores : (n_samples, n_candidates) weighted mean of the finite selected errors; NaN
        where a candidate has none (or only zero-weight ones).
    coverage : (n_samples, n_candidates) int, number of finite selected errors.
    """
    n_trials = np.shape(errors)[2] if np.ndim(errors) == 3 else 0
    selected = _select(errors, trials)
    weights = _weights(weighting, n_trials, trials)
    finite = np.isfinite(selected)
    total = np.where(finite, selected, 0.0) @ weights
    mass = finite.astype(np.float64) @ weights
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), np.nan)
    return scores, finite.sum(axis=2)


def _candidate_class(candidate_class: Sequence[int] | None, n_candidates: int) -> np.ndarray:
    if candidate_class is None:
        return np.arange(n_candidates)
    out = np.asarray(candidate_class, dtype=np.int64).reshape(-1)
    if out.shape[0] != n_candidates:
        raise ValueError(f"candidate_class has {out.shape[0]} entries for {n_candidates} candidates")
    if n_candidates and (out.min() < 0 or set(np.unique(out)) != set(range(int(out.max()) + 1))):
        raise ValueError("candidate_class must give every class 0..K-1 at least one candidate")
    return out


def rank_classes(errors: np.ndarray, trials: Sequence[int] | None = None,
                 weighting: str | Sequence[float] | np.ndarray = "uniform",
                 candidate_class: Sequence[int] | None = None) -> np.ndarray:
    """(n_samples, n_classes) class indices, best first.

    Candidates rank by coverage, then score, then index; a class takes its best
    candidate's place. ``candidate_class`` (n_candidates,) maps candidates to classes;
    None means one candidate per class, in class order.
    """
    scores, coverage = candidate_scores(errors, trials, weighting)
    # lexsort: last key is primary; it is stable, so equal keys keep the lower index
    order = np.lexsort((np.where(np.isnan(scores), np.inf, scores), -coverage), axis=-1)
    if candidate_class is None:
        return order
    owner = _candidate_class(candidate_class, scores.shape[1])
    n_samples, n_candidates = order.shape
    place = np.empty_like(order)
    np.put_along_axis(place, order, np.arange(n_candidates)[None, :].repeat(n_samples, 0), axis=1)
    best = np.full((int(owner.max()) + 1, n_samples), n_candidates, dtype=np.int64)
    np.minimum.at(best, owner, place.T)  # best[k, s]: place of class k's best candidate
    return np.argsort(best.T, axis=1, kind="stable")


def _labels(labels: Sequence[int], n_samples: int, n_classes: int) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.shape[0] != n_samples:
        raise ValueError(f"{labels.shape[0]} labels for {n_samples} samples")
    if n_samples and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}); got {labels.min()} .. {labels.max()}")
    return labels


def score(errors: np.ndarray, labels: Sequence[int], trials: Sequence[int] | None = None,
          weighting: str | Sequence[float] | np.ndarray = "uniform",
          candidate_class: Sequence[int] | None = None) -> dict:
    """Accuracy and confusion of the Diffusion Classifier from cached errors.

    Parameters are those of ``candidate_scores`` and ``rank_classes``; ``labels`` is
    (n_samples,) int.

    Returns
    -------
    dict with ``accuracy`` (float), ``per_class_accuracy`` ((K,) float, NaN for classes
    without samples), ``confusion`` ((K, K) int64, rows = true class, columns =
    predicted), ``predictions`` ((n_samples,) int64), ``forward_passes`` (finite cells
    over the selected trials: the denoiser forwards the selection rests on) and
    ``forward_passes_per_sample``.
    """
    ranking = rank_classes(errors, trials, weighting, candidate_class)
    n_samples, n_classes = ranking.shape
    labels = _labels(labels, n_samples, n_classes)
    predictions = ranking[:, 0].astype(np.int64)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)
    passes = int(np.isfinite(_select(errors, trials)).sum())
    return {
        "accuracy": float((predictions == labels).mean()) if n_samples else float("nan"),
        "per_class_accuracy": per_class,
        "confusion": confusion,
        "predictions": predictions,
        "forward_passes": passes,
        "forward_passes_per_sample": passes / n_samples if n_samples else float("nan"),
    }


def topk_accuracy(errors: np.ndarray, labels: Sequence[int], k: int, trials: Sequence[int] | None = None,
                  weighting: str | Sequence[float] | np.ndarray = "uniform",
                  candidate_class: Sequence[int] | None = None) -> float:
    """Fraction of samples whose label is among the ``k`` best-ranked classes.

    Needs at least ``k`` classes with a candidate evaluated at every selected trial of
    every sample: beyond them the ranking is the elimination order, not a score. For an
    adaptive run select the first round's trials (evaluated for every candidate).
    """
    ranking = rank_classes(errors, trials, weighting, candidate_class)
    n_samples, n_classes = ranking.shape
    labels = _labels(labels, n_samples, n_classes)
    if not 1 <= k <= n_classes:
        raise ConfigError(f"k must be between 1 and the {n_classes} classes; got {k}")
    complete = np.isfinite(_select(errors, trials)).all(axis=2)  # (S, P)
    owner = _candidate_class(candidate_class, complete.shape[1])
    per_class = np.zeros((n_samples, n_classes), dtype=bool)
    for c in range(complete.shape[1]):
        per_class[:, owner[c]] |= complete[:, c]
    full = per_class.sum(axis=1)
    if n_samples and full.min() < k:
        raise ConfigError(
            f"top-{k} needs {k} classes evaluated at every selected trial, but sample {int(full.argmin())} "
            f"has {int(full.min())}; select trials every class was evaluated on "
            "(an adaptive run's first round)"
        )
    return float((ranking[:, :k] == labels[:, None]).any(axis=1).mean()) if n_samples else float("nan")


def select_trials(trial_timesteps: Sequence[int], timesteps: Sequence[int] | None = None,
                  trial_draws: Sequence[int] | None = None, draws: Sequence[int] | None = None) -> np.ndarray:
    """Trial indices whose timestep is in ``timesteps`` and whose draw is in ``draws`` (None: any).

    trial_timesteps, trial_draws : (n_trials,) each trial's timestep and noise draw (the
        store's ``timestep`` and ``draw`` coordinates). ``ConfigError`` names any
        requested timestep or draw the plan does not have.
    """
    t_of = np.asarray(trial_timesteps, dtype=np.int64).reshape(-1)
    d_of = np.zeros_like(t_of) if trial_draws is None else np.asarray(trial_draws, dtype=np.int64).reshape(-1)
    keep = np.ones(t_of.shape[0], dtype=bool)
    if timesteps is not None:
        missing = sorted({int(t) for t in timesteps} - set(t_of.tolist()))
        if missing:
            grid = sorted(set(t_of.tolist()))
            raise ConfigError(f"timesteps {missing[:8]} are not trials of the plan; valid: "
                              f"{grid[:4]} ... ({len(grid)} in all)")
        keep &= np.isin(t_of, np.asarray(list(timesteps), dtype=np.int64))
    if draws is not None:
        missing = sorted({int(d) for d in draws} - set(d_of.tolist()))
        if missing:
            raise ConfigError(f"noise draws {missing[:8]} are not in the plan, which has draws "
                              f"0..{int(d_of.max())}")
        keep &= np.isin(d_of, np.asarray(list(draws), dtype=np.int64))
    return np.flatnonzero(keep)


def timestep_weights(timesteps: Sequence[int], kind: str, alphas_cumprod: Sequence[float] | None = None
                     ) -> np.ndarray:
    """Per-trial weights for ``score(weighting=...)``, from the plan and the scheduler.

    With ``a = alphas_cumprod[t]`` and ``snr = a / (1 - a)``:
    ``uniform`` 1 (the paper's choice); ``snr`` snr(t), stressing low-noise trials;
    ``x0`` 1/snr(t), which turns the eps error into the error of the implied clean
    image (``||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / snr``); ``elbo`` the
    variational bound's weight ``snr(t-1)/snr(t) - 1`` (DDPM's ``beta_t / (alpha_t (1 -
    abar_{t-1}))``), undefined at ``t = 0``.
    """
    t = np.asarray(timesteps, dtype=np.int64).reshape(-1)
    if kind not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {kind!r}{did_you_mean(kind, WEIGHTINGS)}; "
                          f"valid: {', '.join(WEIGHTINGS)}")
    if kind == "uniform":
        return np.ones(t.shape[0])
    if alphas_cumprod is None:
        raise ConfigError(f"weighting {kind!r} needs the scheduler's alphas_cumprod")
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    snr = abar / (1.0 - abar)
    if kind == "snr":
        return snr[t]
    if kind == "x0":
        return 1.0 / snr[t]
    if (t == 0).any():
        raise ConfigError("the elbo weight is infinite at t=0; drop t=0 from the trials")
    return snr[t - 1] / snr[t] - 1.0


def confusion_png(confusion: np.ndarray, class_names: Sequence[str], path: str | Path,
                  title: str | None = None) -> Path:
    """Write a row-normalised confusion matrix (true rows, predicted columns) as a PNG.

    Class names label the axes up to 60 classes; counts are written in the cells up
    to 25 classes. Returns the path.
    """
    from matplotlib.figure import Figure  # lazy: scoring imports without matplotlib

    confusion = np.asarray(confusion)
    n = confusion.shape[0]
    if confusion.shape != (n, n) or len(class_names) != n:
        raise ValueError(f"confusion {confusion.shape} needs a square matrix and one name per class "
                         f"({len(class_names)} names)")
    rows = confusion.sum(axis=1, keepdims=True)
    rates = confusion / np.maximum(rows, 1)
    size = min(max(5.0, 0.32 * n + 2.5), 30.0)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    if n <= 60:
        fontsize = 9 if n <= 20 else 6
        ax.set_xticks(range(n), [str(c) for c in class_names], rotation=90, fontsize=fontsize)
        ax.set_yticks(range(n), [str(c) for c in class_names], fontsize=fontsize)
    if n <= 25:
        for (i, j), count in np.ndenumerate(confusion):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    from pipeline.store.location import save_figure

    return save_figure(fig, path, dpi=110)
