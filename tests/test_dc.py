"""The Diffusion Classifier core: trial plans, eps keying, adaptive elimination, losses."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.dc.classifier import (
    EPS_SCHEME,
    PUBLISHED_SCHEDULES,
    Schedule,
    TrialPlan,
    adaptive_classify,
    adaptive_classify_batch,
    denoising_losses,
    evaluate_grid,
    make_plan,
    sample_eps,
    stage_trials,
)
from pipeline.errors import ConfigError, ModelError
from pipeline.noise import sample_noise
from pipeline.dc.scoring import score

T = 1000


# --- trial plans -----------------------------------------------------------------------------

@pytest.mark.parametrize("n, first, step",
                         [(50, 10, 20), (500, 1, 2), (1000, 0, 1), (25, 20, 40), (250, 2, 4)])
def test_even_plan_is_centred_in_equal_bins(n, first, step):
    plan = make_plan(n, T, "even")
    # t = T/n/2 + k T/n, for n dividing T
    assert plan.timesteps == tuple(first + k * step for k in range(n))
    assert plan.timesteps == tuple(T // n // 2 + k * (T // n) for k in range(n))


def test_even_plan_when_n_does_not_divide_T_uses_integer_bins():
    # the reference's integer arithmetic: bins of T // n, the tail of [0, T) unused
    assert make_plan(3, T).timesteps == (166, 499, 832)
    assert make_plan(300, T).timesteps[-1] == 1 + 299 * 3


def test_random_plan_is_distinct_sorted_and_seeded():
    a, b = make_plan(40, T, "random", seed=1), make_plan(40, T, "random", seed=1)
    c = make_plan(40, T, "random", seed=2)
    assert a == b and a != c
    assert len(set(a.timesteps)) == 40 and list(a.timesteps) == sorted(a.timesteps)
    assert 0 <= a.timesteps[0] and a.timesteps[-1] < T


def test_plan_round_trips_through_attrs():
    plan = make_plan(20, T, "random", seed=3)
    data = json.loads(json.dumps(plan.to_dict()))
    assert TrialPlan.from_dict(data) == plan and data["eps_scheme"] == EPS_SCHEME


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_trials=0), "between 1 and num_train_timesteps"),
    (dict(n_trials=2000), "between 1 and num_train_timesteps"),
    (dict(n_trials=10, mode="evn"), "did you mean 'even'"),
])
def test_bad_plans_say_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_plan(**kwargs)


def test_explicit_plan_rejects_unsorted_or_out_of_range_timesteps():
    with pytest.raises(ConfigError, match="sort them"):
        TrialPlan((5, 3))
    with pytest.raises(ConfigError, match=r"\[0, 1000\)"):
        TrialPlan((5, 1000))


# --- eps keying ------------------------------------------------------------------------------

def test_eps_is_the_shared_per_sample_noise_of_view_0():
    key = "diffprobe-noise-v1|7|img/001.png|0|499"
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    expected = torch.randn((2, 3, 3), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sample_eps(7, "img/001.png", 499, (2, 3, 3)), expected)
    assert torch.equal(sample_eps(7, "img/001.png", 499, (2, 3, 3)),
                       sample_noise(7, "img/001.png", 0, 499, (2, 3, 3)))


def test_eps_depends_on_seed_sample_and_timestep_only():
    base = sample_eps(0, 3, 10, (4, 8, 8))
    assert torch.equal(base, sample_eps(0, 3, 10, (4, 8, 8)))
    for other in (sample_eps(1, 3, 10, (4, 8, 8)), sample_eps(0, 4, 10, (4, 8, 8)),
                  sample_eps(0, 3, 11, (4, 8, 8))):
        assert not torch.equal(base, other)
    # keyed by timestep, not by position: a 50-trial and a 500-trial plan agree where they share t
    small, big = make_plan(50, T), make_plan(500, T)
    shared = sorted(set(small.timesteps) & set(big.timesteps))
    assert len(shared) == 0  # even grids for 50 and 500 are disjoint (10, 30, ... vs 1, 3, ...)
    sub = big.subset([5, 15])
    assert torch.equal(sub.eps("s", 0, (3,)), big.eps("s", 5, (3,)))


# --- schedules -------------------------------------------------------------------------------

def test_cifar_schedule_stage_two_reuses_stage_one():
    plan = make_plan(500, T)
    first, second = stage_trials(plan.n_trials, [50, 500])
    # stage 1: every 10th grid entry from the 5th: t = 11, 31, ..., 991 (evenly spaced)
    assert [plan.timesteps[i] for i in first] == list(range(11, 1000, 20))
    assert len(second) == 450 and set(first).isdisjoint(second)
    assert set(first) | set(second) == set(range(500))


def test_imagenet_schedule_matches_the_reference_selection():
    stages = stage_trials(1000, [50, 100, 500, 1000])
    assert [len(s) for s in stages] == [50, 100, 400, 450]
    assert stages[0] == list(range(10, 1000, 20))
    assert stages[1] == list(range(5, 1000, 10))  # odd positions: shares nothing with stage 1
    assert set(stages[2]) == set(range(1, 1000, 2)) - set(stages[1])
    assert sorted(i for s in stages for i in s) == list(range(1000))


def test_stage_sets_are_strided_subsets_of_the_grid():
    # independent arithmetic: stride = grid // n, positions stride//2 + k*stride, first n
    grid, n_samples = 500, [20, 50, 100, 500]
    seen = set()
    for n, new in zip(n_samples, stage_trials(grid, n_samples)):
        stride = grid // n
        wanted = [stride // 2 + k * stride for k in range(n)]
        assert new == [i for i in wanted if i not in seen]
        seen |= set(new)


@pytest.mark.parametrize("name, n_classes", [("cifar10", 10), ("pets", 37), ("stl10", 10), ("food", 101),
                                             ("aircraft", 100), ("flowers", 102), ("imagenet", 1000)])
def test_published_schedules_are_valid_as_published(name, n_classes):
    schedule = PUBLISHED_SCHEDULES[name]
    schedule.validate(n_classes, max(schedule.n_samples))


@pytest.mark.parametrize("n_samples, to_keep, message", [
    ([50, 500], [5], "same length"),
    ([], [], "non-empty"),
    ([500, 50], [5, 1], "must increase"),
    ([50, 50], [5, 1], "must increase"),
    ([50, 500], [1, 5], "must not increase"),
    ([50, 500], [5, 2], "must end with 1"),
    ([50, 500], [20, 1], "to_keep\\[0\\]=20 exceeds the 10 classes"),
    ([50, 600], [5, 1], "make the plan with n_trials=600"),
    ([0, 500], [5, 1], "positive"),
])
def test_bad_schedules_say_the_fix(n_samples, to_keep, message):
    with pytest.raises(ConfigError, match=message):
        adaptive_classify(lambda c, t: np.zeros((len(c), len(t))), 10, n_samples, to_keep, n_trials=500)


# --- adaptive elimination --------------------------------------------------------------------

def synthetic_errors(rng, n_classes, n_trials, label, margin=0.2, noise=0.05):
    """error = timestep-dependent base + noise; the true class is lower by ``margin``."""
    base = np.linspace(0.05, 1.0, n_trials)[None, :]
    errors = base + noise * rng.standard_normal((n_classes, n_trials)) + margin
    errors[label] -= margin
    return errors


def test_error_fn_is_asked_only_for_new_pairs_of_alive_classes():
    rng = np.random.default_rng(0)
    table = synthetic_errors(rng, 10, 500, label=3)
    calls = []

    def error_fn(classes, trials):
        calls.append((list(classes), list(trials)))
        return table[np.ix_(classes, trials)]

    result = adaptive_classify(error_fn, 10, [50, 500], [5, 1])
    first, second = stage_trials(500, [50, 500])
    assert calls[0] == (list(range(10)), first)
    assert calls[1] == (list(result.survivors[0]), second) and len(result.survivors[0]) == 5
    pairs = [(c, t) for cs, ts in calls for c in cs for t in ts]
    assert len(pairs) == len(set(pairs)) == result.forward_passes == 10 * 50 + 5 * 450
    evaluated = np.zeros((10, 500), bool)
    evaluated[tuple(np.array(pairs).T)] = True
    assert np.array_equal(np.isfinite(result.errors["l2"]), evaluated)
    assert result.prediction == 3 and result.survivors[-1] == (3,)
    # survivors of stage 1 are the 5 lowest means over stage-1 trials
    assert set(result.survivors[0]) == set(np.argsort(table[:, first].mean(axis=1))[:5])


def test_elimination_averages_every_trial_evaluated_so_far():
    # 4-trial grid, [2, 4]/[2, 1]: stage 1 evaluates trials 1, 3; stage 2 adds 0, 2
    table = np.array([[2.0, 0.5, 2.0, 0.5],    # class 0: good early, bad later (mean 1.25)
                      [1.0, 0.6, 1.0, 0.6],    # class 1: mean 0.8 -> wins
                      [0.0, 0.7, 0.0, 0.7]])   # class 2: eliminated in stage 1
    result = adaptive_classify(lambda c, t: table[np.ix_(c, t)], 3, [2, 4], [2, 1])
    assert result.survivors == ((0, 1), (1,)) and result.prediction == 1
    assert np.isnan(result.errors["l2"][2, [0, 2]]).all()


def test_adaptive_spends_fewer_passes_and_agrees_with_exhaustive_on_clear_margins():
    rng = np.random.default_rng(1)
    n_classes, n_trials, labels = 10, 500, np.arange(30) % 10
    tables = [synthetic_errors(rng, n_classes, n_trials, y) for y in labels]

    def error_fn(requests):
        return [tables[r.item][np.ix_(r.class_ids, r.trial_ids)] for r in requests]

    adaptive = adaptive_classify_batch(error_fn, len(labels), n_classes, [50, 500], [5, 1])
    every = Schedule.exhaustive(n_trials)
    exhaustive = adaptive_classify_batch(error_fn, len(labels), n_classes, every.n_samples, every.to_keep)
    assert [r.prediction for r in adaptive] == [r.prediction for r in exhaustive] == list(labels)
    assert all(r.forward_passes == 2750 for r in adaptive)
    assert all(r.forward_passes == 5000 for r in exhaustive)
    # the store's tensor re-scores to the same predictions
    stacked = np.stack([r.errors["l2"] for r in adaptive])
    assert np.array_equal(score(stacked, labels)["predictions"], labels)
    assert score(stacked, labels)["forward_passes"] == 2750 * len(labels)


def test_batch_driver_equals_one_sample_at_a_time():
    rng = np.random.default_rng(2)
    tables = [synthetic_errors(rng, 12, 100, y, margin=0.01, noise=0.1) for y in range(6)]
    batch = adaptive_classify_batch(
        lambda reqs: [tables[r.item][np.ix_(r.class_ids, r.trial_ids)] for r in reqs],
        6, 12, [20, 50, 100], [6, 3, 1])
    for item, result in enumerate(batch):
        single = adaptive_classify(lambda c, t: tables[item][np.ix_(c, t)], 12, [20, 50, 100], [6, 3, 1])
        assert single.prediction == result.prediction and single.survivors == result.survivors
        np.testing.assert_array_equal(single.errors["l2"], result.errors["l2"])


def test_every_loss_is_kept_and_the_configured_one_eliminates():
    rng = np.random.default_rng(3)
    l2, l1 = rng.random((5, 20)), rng.random((5, 20))
    l1[4] = 0.0  # class 4 is best under l1 only

    def error_fn(c, t):
        return {"l2": l2[np.ix_(c, t)], "l1": l1[np.ix_(c, t)]}

    by_l1 = adaptive_classify(error_fn, 5, [20], [1], loss="l1")
    by_l2 = adaptive_classify(error_fn, 5, [20], [1], loss="l2")
    assert by_l1.prediction == 4 and by_l2.prediction == int(l2.mean(axis=1).argmin())
    np.testing.assert_array_equal(by_l1.errors["l2"], l2)
    with pytest.raises(ConfigError, match="choose one of them"):
        adaptive_classify(error_fn, 5, [20], [1], loss="huber")


def test_non_finite_errors_are_refused():
    with pytest.raises(ModelError, match="class 1, trial 0"):
        adaptive_classify(lambda c, t: np.where(np.array(c)[:, None] == 1, np.inf, 0.0) + np.zeros(len(t)),
                          3, [4], [1])


def test_ties_go_to_the_lowest_class_index():
    assert adaptive_classify(lambda c, t: np.ones((len(c), len(t))), 4, [5, 10], [2, 1]).prediction == 0


# --- losses and the model-facing grid --------------------------------------------------------

def test_losses_match_their_definitions():
    eps = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 2.0, 0.0]])
    pred = torch.tensor([[0.5, -3.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]).half()
    losses = denoising_losses(eps, pred)
    d = (pred.float() - eps).abs().numpy()
    np.testing.assert_allclose(losses["l2"].numpy(), (d ** 2).mean(axis=1))
    np.testing.assert_allclose(losses["l1"].numpy(), d.mean(axis=1))
    huber = np.where(d <= 1, 0.5 * d ** 2, d - 0.5).mean(axis=1)
    np.testing.assert_allclose(losses["huber"].numpy(), huber)
    assert all(v.dtype == torch.float32 and v.shape == (2,) for v in losses.values())


class RecordingDenoiser:
    """A tiny class-conditional 'model' that records every input it is called with."""

    def __init__(self, n_classes, shape):
        gen = torch.Generator().manual_seed(0)
        size = int(np.prod(shape))
        self.weight = torch.randn(size, size, generator=gen) / size ** 0.5
        self.class_bias = torch.randn(n_classes, size, generator=gen)
        self.calls = []

    def __call__(self, x_t, t, class_ids):
        for x, tt, c in zip(x_t, t.tolist(), class_ids.tolist()):
            self.calls.append((tt, c, x.clone()))
        flat = x_t.flatten(1).float()
        out = flat @ self.weight + 0.3 * self.class_bias[class_ids] + 1e-3 * t[:, None].float()
        return out.reshape(x_t.shape)


def linear_alphas(T=T):
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)


def test_every_class_of_a_sample_sees_the_same_t_and_eps():
    shape, n_classes = (2, 4, 4), 5
    plan, alphas = make_plan(8, T, seed=11), linear_alphas()
    model = RecordingDenoiser(n_classes, shape)
    x0 = {key: torch.randn(shape, generator=torch.Generator().manual_seed(i))
          for i, key in enumerate(["a", "b"])}
    for key in x0:
        error_fn = lambda c, t, key=key: evaluate_grid(model, x0[key], plan, key, c, t, alphas, batch_size=7)
        adaptive_classify(error_fn, n_classes, [4, 8], [2, 1])
    # split calls by sample (order: all of a, then all of b) and group by timestep
    n_a = len(model.calls) // 2
    for key, calls in (("a", model.calls[:n_a]), ("b", model.calls[n_a:])):
        by_t = {}
        for t, c, x in calls:
            by_t.setdefault(t, []).append((c, x))
        assert set(by_t) == set(plan.timesteps)
        for t, seen in by_t.items():
            eps = sample_eps(11, key, t, shape)
            a = alphas[t]
            expected = (a.sqrt() * x0[key].double() + (1 - a).sqrt() * eps.double()).float()
            for c, x in seen:
                torch.testing.assert_close(x, expected)  # same (t, eps) for every class
            assert len({c for c, _ in seen}) == len(seen)
        stage_one_t = {plan.timesteps[i] for i in stage_trials(8, [4, 8])[0]}
        assert all(len(by_t[t]) == n_classes for t in stage_one_t)
    assert not torch.equal(model.calls[0][2], model.calls[n_a][2])  # other sample, other eps


def test_grid_errors_equal_an_independent_recomputation():
    shape, n_classes = (3, 4, 4), 3
    plan, alphas = make_plan(6, T, seed=5), linear_alphas()
    model = RecordingDenoiser(n_classes, shape)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    grid = evaluate_grid(model, x0, plan, 42, [0, 2], [1, 4, 5], alphas, batch_size=4)
    for ci, c in enumerate([0, 2]):
        for ti, trial in enumerate([1, 4, 5]):
            t = plan.timesteps[trial]
            eps = sample_eps(5, 42, t, shape)
            x_t = (alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * eps).float()
            pred = model(x_t[None], torch.tensor([t]), torch.tensor([c]))[0]
            assert grid["l2"][ci, ti] == pytest.approx(F.mse_loss(pred, eps).item(), rel=1e-5)
            assert grid["l1"][ci, ti] == pytest.approx(F.l1_loss(pred, eps).item(), rel=1e-5)
            assert grid["huber"][ci, ti] == pytest.approx(F.huber_loss(pred, eps).item(), rel=1e-5)


def test_scoring_a_trial_subset_equals_running_with_that_subset():
    shape, n_classes, keys = (2, 4, 4), 4, ["x", "y", "z"]
    plan, alphas = make_plan(20, T, seed=2), linear_alphas()
    model = RecordingDenoiser(n_classes, shape)
    x0 = {k: torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, k in enumerate(keys)}

    def run(p):
        results = [adaptive_classify(lambda c, t, k=k: evaluate_grid(model, x0[k], p, k, c, t, alphas, 16),
                                     n_classes, [p.n_trials], [1]) for k in keys]
        return np.stack([r.errors["l2"] for r in results]), [r.prediction for r in results]

    full, _ = run(plan)
    subset = [1, 5, 6, 13, 19]
    sub_errors, sub_predictions = run(plan.subset(subset))
    np.testing.assert_allclose(full[:, :, subset], sub_errors, rtol=1e-6)
    labels = [0, 1, 2]
    assert list(score(full, labels, trials=subset)["predictions"]) == sub_predictions
    assert list(score(sub_errors, labels)["predictions"]) == sub_predictions
