"""Scoring cached Diffusion-Classifier errors: ranking, NaN handling, weights, confusion."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.dc.classifier import Schedule, adaptive_classify, make_plan, round_timesteps
from pipeline.errors import ConfigError
from pipeline.dc.scoring import (
    candidate_scores,
    confusion_png,
    rank_classes,
    score,
    select_trials,
    timestep_weights,
    topk_accuracy,
)


def nanmean_argmin(errors):
    """Independent reference: argmin of nanmean, all-NaN classes last, ties to lowest index."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(errors, axis=2)
    return np.argmin(np.where(np.isnan(means), np.inf, means), axis=1)


def test_predictions_are_argmin_of_nanmean_when_classes_are_evaluated_all_or_nothing():
    rng = np.random.default_rng(0)
    errors = rng.random((40, 7, 12))
    dropped = rng.random((40, 7)) < 0.4          # eliminated classes: NaN on every trial
    dropped[:, 0] &= rng.random(40) < 0.5
    errors[dropped] = np.nan
    errors[3] = np.nan                           # a sample with nothing evaluated -> class 0
    labels = rng.integers(0, 7, 40)
    result = score(errors, labels)
    np.testing.assert_array_equal(result["predictions"], nanmean_argmin(errors))
    assert result["predictions"][3] == 0
    assert result["accuracy"] == pytest.approx(np.mean(nanmean_argmin(errors) == labels))
    assert result["forward_passes"] == int(np.isfinite(errors).sum())


def test_plain_nanmean_would_misread_an_adaptive_tensor_but_coverage_ranking_does_not():
    # class 2 was eliminated on round-1 trials where errors are low; its mean there (0.7)
    # is below the survivor's mean over all trials (0.8), which is not a fair comparison
    table = np.array([[2.0, 0.5, 2.0, 0.5], [1.0, 0.6, 1.0, 0.6], [0.0, 0.7, 0.0, 0.7]])
    result = adaptive_classify(lambda c, t: table[np.ix_(c, t)], 3, make_plan(4), Schedule((2, 4), (2, 1)))
    cached = result.errors["l2"][None]
    assert nanmean_argmin(cached)[0] == 2
    assert score(cached, [1])["predictions"][0] == result.winner == 1
    np.testing.assert_array_equal(rank_classes(cached), [[1, 0, 2]])
    # on the first round's trials every class competes on its mean
    first = round_timesteps(4, [2, 4])[0]
    assert score(cached, [0], trials=first)["predictions"][0] == 0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_ranking_matches_a_sort_by_coverage_then_mean(n_samples, n_classes, n_trials, seed):
    rng = np.random.default_rng(seed)
    # multiples of 1/8 make ties, and exact ones: their sums are exact in float64, so a tie
    # is a tie to both the matmul mean and numpy's mean (multiples of 0.1 summed in another
    # order differ in the last bit: 0.1 + 0.2 vs 0.3 + 0.0)
    errors = np.round(rng.random((n_samples, n_classes, n_trials)) * 8) / 8
    errors[rng.random(errors.shape) < 0.3] = np.nan
    trials = sorted(rng.choice(n_trials, size=rng.integers(1, n_trials + 1), replace=False).tolist())
    ranking = rank_classes(errors, trials)
    for s in range(n_samples):
        def key(c):
            values = errors[s, c, trials]
            finite = values[np.isfinite(values)]
            return (-len(finite), finite.mean() if len(finite) else np.inf, c)
        assert ranking[s].tolist() == sorted(range(n_classes), key=key)


def test_confusion_counts_and_per_class_accuracy():
    # predictions forced through the errors: class p gets error 0, the rest 1
    labels = np.array([0, 0, 1, 1, 1, 2, 0])
    predicted = np.array([0, 1, 1, 1, 0, 2, 0])
    errors = np.ones((7, 4, 3))
    errors[np.arange(7), predicted] = 0.0
    result = score(errors, labels)
    expected = np.zeros((4, 4), int)
    for y, p in zip(labels, predicted):
        expected[y, p] += 1
    np.testing.assert_array_equal(result["confusion"], expected)
    np.testing.assert_allclose(result["per_class_accuracy"][:3], [2 / 3, 2 / 3, 1.0])
    assert np.isnan(result["per_class_accuracy"][3])  # class without samples
    assert result["accuracy"] == pytest.approx(5 / 7)
    assert result["forward_passes_per_sample"] == 12


def test_weights_are_a_weighted_mean_and_zero_weight_drops_a_trial():
    rng = np.random.default_rng(1)
    errors = rng.random((20, 5, 6))
    weights = np.array([1.0, 0.0, 2.0, 0.5, 0.0, 3.0])
    scores, coverage = candidate_scores(errors, weighting=weights)
    np.testing.assert_allclose(scores, (errors * weights).sum(axis=2) / weights.sum())
    assert (coverage == 6).all()
    kept = np.flatnonzero(weights)
    np.testing.assert_array_equal(
        score(errors, np.zeros(20, int), weighting=np.where(weights > 0, 1.0, 0.0))["predictions"],
        score(errors, np.zeros(20, int), trials=kept)["predictions"])
    # weights index the full trial axis; a subset picks its own weights
    sub_scores, _ = candidate_scores(errors, trials=[0, 2], weighting=weights)
    np.testing.assert_allclose(sub_scores, (errors[:, :, 0] + 2 * errors[:, :, 2]) / 3)


def test_timestep_weights_follow_the_scheduler():
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    t = np.array([1, 10, 500, 999])
    snr = abar[t] / (1 - abar[t])
    np.testing.assert_allclose(timestep_weights(t, "snr", abar), snr)
    np.testing.assert_allclose(timestep_weights(t, "x0", abar), 1 / snr)
    # DDPM's VLB weight for eps-prediction: beta_t / (alpha_t (1 - abar_{t-1}))
    np.testing.assert_allclose(timestep_weights(t, "elbo", abar),
                               betas[t] / ((1 - betas[t]) * (1 - abar[t - 1])), rtol=1e-9)
    np.testing.assert_array_equal(timestep_weights(t, "uniform"), np.ones(4))
    with pytest.raises(ConfigError, match="drop t=0"):
        timestep_weights([0, 5], "elbo", abar)
    with pytest.raises(ConfigError, match="needs the scheduler"):
        timestep_weights(t, "snr")


@pytest.mark.parametrize("kwargs, message", [
    (dict(trials=[]), "empty"),
    (dict(trials=[0, 9]), r"\[0, 6\)"),
    (dict(weighting="snr"), "timestep_weights"),
    (dict(weighting="unifrom"), "did you mean 'uniform'"),
    (dict(weighting=np.ones(4)), "one weight per trial"),
    (dict(weighting=-np.ones(6)), "non-negative"),
])
def test_bad_scoring_arguments_say_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        score(np.zeros((2, 3, 6)), [0, 1], **kwargs)


def test_topk_accuracy():
    errors = np.array([[[0.2], [0.1], [0.3]],       # ranking 1, 0, 2
                       [[0.3], [0.2], [0.1]]])      # ranking 2, 1, 0
    labels = [0, 0]
    assert topk_accuracy(errors, labels, 1) == score(errors, labels)["accuracy"] == 0.0
    assert topk_accuracy(errors, labels, 2) == 0.5
    assert topk_accuracy(errors, labels, 3) == 1.0
    with pytest.raises(ConfigError, match="between 1 and the 3 classes"):
        topk_accuracy(errors, labels, 4)


def test_topk_on_an_adaptive_tensor_needs_trials_every_class_saw():
    rng = np.random.default_rng(2)
    table = rng.random((6, 40))
    cached = adaptive_classify(lambda c, t: table[np.ix_(c, t)], 6, make_plan(40),
                               Schedule((10, 40), (3, 1))).errors["l2"][None]
    first = round_timesteps(40, [10, 40])[0]
    round_one_order = np.argsort(table[:, first].mean(axis=1))
    # the last round evaluates round 1's 3 survivors on every trial, then keeps 1:
    # the worst of them is still in the top 3 over all trials
    survivors = round_one_order[:3]
    worst_survivor = survivors[np.argmax(table[survivors].mean(axis=1))]
    assert topk_accuracy(cached, [worst_survivor], 3) == 1.0
    assert topk_accuracy(cached, [worst_survivor], 2) == 0.0
    with pytest.raises(ConfigError, match="an adaptive run's first round"):
        topk_accuracy(cached, [0], 4)
    fourth = round_one_order[3]
    assert topk_accuracy(cached, [fourth], 4, trials=first) == 1.0
    assert topk_accuracy(cached, [fourth], 3, trials=first) == 0.0

def test_select_trials_by_timestep_and_draw():
    np.testing.assert_array_equal(select_trials([10, 30, 50, 70], [50, 10]), [0, 2])
    with pytest.raises(ConfigError, match=r"timesteps \[20\] are not trials"):
        select_trials([10, 30], [20])
    # two draws per timestep: a timestep selects both, a draw selects one per timestep
    t_of, d_of = [10, 10, 30, 30, 50, 50], [0, 1, 0, 1, 0, 1]
    np.testing.assert_array_equal(select_trials(t_of, [30], d_of), [2, 3])
    np.testing.assert_array_equal(select_trials(t_of, None, d_of, [1]), [1, 3, 5])
    np.testing.assert_array_equal(select_trials(t_of, [10, 50], d_of, [0]), [0, 4])
    with pytest.raises(ConfigError, match=r"noise draws \[2\] are not in the plan"):
        select_trials(t_of, None, d_of, [2])


# ----------------------------------------------------------------- several prompts per class


def best_prompt_prediction(errors, candidate_class, trials):
    """Independent numpy recomputation for fully evaluated tensors: each class's score is the
    minimum over its prompts of the prompt's mean error; predict the argmin class."""
    means = errors[:, :, trials].mean(axis=2)                       # (S, P)
    n_classes = max(candidate_class) + 1
    per_class = np.stack([means[:, [p for p, c in enumerate(candidate_class) if c == k]].min(axis=1)
                          for k in range(n_classes)], axis=1)       # (S, K)
    return per_class.argmin(axis=1), per_class


def test_a_class_scores_as_its_best_prompt():
    rng = np.random.default_rng(5)
    candidate_class = [0, 1, 1, 2, 0, 2, 2, 3]   # 4 classes, 8 prompts, rows in any order
    errors = rng.random((50, 8, 10))
    labels = rng.integers(0, 4, 50)
    for trials in (None, [1, 4, 7]):
        chosen = list(range(10)) if trials is None else trials
        expected, per_class = best_prompt_prediction(errors, candidate_class, chosen)
        result = score(errors, labels, trials=trials, candidate_class=candidate_class)
        np.testing.assert_array_equal(result["predictions"], expected)
        assert result["accuracy"] == pytest.approx(np.mean(expected == labels))
        assert result["confusion"].shape == (4, 4) and result["confusion"].sum() == 50
        # the whole class ranking follows the per-class minimum
        ranking = rank_classes(errors, trials, candidate_class=candidate_class)
        np.testing.assert_array_equal(ranking, np.argsort(per_class, axis=1, kind="stable"))
    # top-k counts classes, not prompts
    _, per_class = best_prompt_prediction(errors, candidate_class, list(range(10)))
    top2 = np.argsort(per_class, axis=1)[:, :2]
    assert topk_accuracy(errors, labels, 2, candidate_class=candidate_class) == pytest.approx(
        np.mean([y in row for y, row in zip(labels, top2)]))


def test_an_adaptive_run_over_prompts_rescores_to_the_class_of_the_winning_prompt():
    rng = np.random.default_rng(6)
    candidate_class = [0, 0, 1, 1, 2, 2]
    table = rng.random((6, 20))
    result = adaptive_classify(lambda c, t: table[np.ix_(c, t)], 6, make_plan(20), Schedule((5, 20), (3, 1)))
    cached = result.errors["l2"][None]
    prediction = score(cached, [0], candidate_class=candidate_class)["predictions"][0]
    assert prediction == candidate_class[result.winner]


def test_candidate_class_must_cover_every_class():
    with pytest.raises(ValueError, match="at least one candidate"):
        score(np.zeros((1, 3, 2)), [0], candidate_class=[0, 2, 2])


@pytest.mark.parametrize("n_classes", [3, 100])
def test_confusion_png_is_written(tmp_path, n_classes):
    rng = np.random.default_rng(3)
    confusion = rng.integers(0, 5, (n_classes, n_classes))
    names = [f"class number {i}" for i in range(n_classes)]
    path = confusion_png(confusion, names, tmp_path / "confusion.png", title="digits")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="one name per class"):
        confusion_png(confusion, names[:-1], tmp_path / "bad.png")
