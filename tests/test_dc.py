"""The Diffusion Classifier core: trial plans (grid x noise draws), eps keying, elimination in rounds,
losses. The model-facing error grid is tested through the classify stage (test_classify.py)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from pipeline.dc.classifier import (
    EPS_SCHEME,
    PUBLISHED_SCHEDULES,
    Schedule,
    TrialPlan,
    adaptive_classify,
    adaptive_classify_batch,
    denoising_losses,
    make_plan,
    passes_per_sample,
    round_timesteps,
    round_trials,
    sample_eps,
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
    drawn = make_plan(5, T, noise_draws=3)
    assert TrialPlan.from_dict(json.loads(json.dumps(drawn.to_dict()))) == drawn


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_timesteps=0), "between 1 and num_train_timesteps"),
    (dict(n_timesteps=2000), "between 1 and num_train_timesteps"),
    (dict(n_timesteps=10, spacing="evn"), "did you mean 'even'"),
    (dict(n_timesteps=10, noise_draws=0), "noise_draws must be >= 1"),
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


def test_noise_draws_are_trials_with_their_own_eps_keyed_by_timestep_and_draw():
    plan = make_plan(4, T, seed=3, noise_draws=3)
    assert plan.n_timesteps == 4 and plan.n_trials == 12
    # timestep-major, as the reference's noise index n_trials * t_idx + j
    assert plan.trial_timesteps == (125,) * 3 + (375,) * 3 + (625,) * 3 + (875,) * 3
    assert plan.trial_draws == (0, 1, 2) * 4
    assert plan.trials_of([1, 3]) == [3, 4, 5, 9, 10, 11]
    for trial in range(plan.n_trials):
        t, d = plan.trial_timesteps[trial], plan.trial_draws[trial]
        assert torch.equal(plan.eps("img", trial, (2, 3)), sample_noise(3, "img", d, t, (2, 3)))
    eps = [plan.eps("img", i, (8,)) for i in range(3)]
    assert not torch.equal(eps[0], eps[1]) and not torch.equal(eps[1], eps[2])
    # draw 0 is the one-draw plan's eps (extract's view 0); draw d is extract's view d
    assert torch.equal(eps[0], make_plan(4, T, seed=3).eps("img", 0, (8,)))


def test_several_draws_per_timestep_follow_the_reference_rounds():
    plan, schedule = make_plan(4, T, noise_draws=2), Schedule((2, 4), (2, 1))
    rounds = round_trials(plan, schedule)
    # round 1: grid positions 1, 3 -> trials (1,0),(1,1),(3,0),(3,1); round 2 the rest
    assert rounds == [[2, 3, 6, 7], [0, 1, 4, 5]]
    assert passes_per_sample(plan, schedule, 5) == 5 * 4 + 2 * 4
    table = np.random.default_rng(0).random((5, 8))
    result = adaptive_classify(lambda c, t: table[np.ix_(c, t)], 5, plan, schedule)
    first = np.argsort(table[:, rounds[0]].mean(axis=1), kind="stable")[:2]
    assert set(result.survivors[0]) == set(first.tolist())
    assert result.winner == first[np.argmin(table[first].mean(axis=1))]
    assert result.forward_passes == 28


# --- schedules -------------------------------------------------------------------------------

def test_cifar_schedule_round_two_reuses_round_one():
    plan = make_plan(500, T)
    first, second = round_timesteps(plan.n_timesteps, [50, 500])
    # round 1: every 10th grid entry from the 5th: t = 11, 31, ..., 991 (evenly spaced)
    assert [plan.timesteps[i] for i in first] == list(range(11, 1000, 20))
    assert len(second) == 450 and set(first).isdisjoint(second)
    assert set(first) | set(second) == set(range(500))


def test_imagenet_schedule_matches_the_reference_selection():
    rounds = round_timesteps(1000, [50, 100, 500, 1000])
    assert [len(s) for s in rounds] == [50, 100, 400, 450]
    assert rounds[0] == list(range(10, 1000, 20))
    assert rounds[1] == list(range(5, 1000, 10))  # odd positions: shares nothing with round 1
    assert set(rounds[2]) == set(range(1, 1000, 2)) - set(rounds[1])
    assert sorted(i for s in rounds for i in s) == list(range(1000))


def reference_rounds(big_t, timesteps_per_round):
    """The reference's eval_prob_adaptive selection, re-derived: the timesteps each round adds."""
    max_n = max(timesteps_per_round)
    grid = list(range(big_t // max_n // 2, big_t, big_t // max_n))[:max_n]
    seen, out = set(), []
    for n in timesteps_per_round:
        cur = [t for t in grid[len(grid) // n // 2::len(grid) // n][:n] if t not in seen]
        seen.update(cur)
        out.append(cur)
    return out


@pytest.mark.parametrize("name", sorted(PUBLISHED_SCHEDULES))
def test_published_schedules_evaluate_the_reference_timesteps(name):
    schedule = PUBLISHED_SCHEDULES[name]
    plan = make_plan(schedule.grid_size, T)
    rounds = round_timesteps(plan.n_timesteps, schedule.timesteps_per_round)
    ours = [[plan.timesteps[i] for i in r] for r in rounds]
    assert ours == reference_rounds(T, schedule.timesteps_per_round)


def test_round_sets_are_strided_subsets_of_the_grid():
    # independent arithmetic: stride = grid // n, positions stride//2 + k*stride, first n
    grid, per_round = 500, [20, 50, 100, 500]
    seen = set()
    for n, new in zip(per_round, round_timesteps(grid, per_round)):
        stride = grid // n
        wanted = [stride // 2 + k * stride for k in range(n)]
        assert new == [i for i in wanted if i not in seen]
        seen |= set(new)


@pytest.mark.parametrize("name, n_classes", [("cifar10", 10), ("pets", 37), ("stl10", 10), ("food", 101),
                                             ("aircraft", 100), ("flowers", 102), ("imagenet", 1000)])
def test_published_schedules_are_valid_as_published(name, n_classes):
    schedule = PUBLISHED_SCHEDULES[name]
    schedule.validate(n_classes, schedule.grid_size)


@pytest.mark.parametrize("per_round, keep, message", [
    ([50, 500], [5], "same length"),
    ([], [], "non-empty"),
    ([500, 50], [5, 1], "must increase"),
    ([50, 50], [5, 1], "must increase"),
    ([50, 500], [1, 5], "must not increase"),
    ([50, 500], [5, 2], "must end with 1"),
    ([50, 500], [20, 1], "keep_per_round\\[0\\]=20 exceeds the 10 candidates"),
    ([50, 600], [5, 1], "use a grid of 600 timesteps"),
    ([50, 250], [5, 1], "timesteps_per_round\\[-1\\]=250 but the grid has 500"),
    ([0, 500], [5, 1], "positive"),
])
def test_bad_schedules_say_the_fix(per_round, keep, message):
    with pytest.raises(ConfigError, match=message):
        adaptive_classify(lambda c, t: np.zeros((len(c), len(t))), 10, make_plan(500, T),
                          Schedule(per_round, keep))


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

    result = adaptive_classify(error_fn, 10, make_plan(500, T), Schedule((50, 500), (5, 1)))
    first, second = round_timesteps(500, [50, 500])
    assert calls[0] == (list(range(10)), first)
    assert calls[1] == (list(result.survivors[0]), second) and len(result.survivors[0]) == 5
    pairs = [(c, t) for cs, ts in calls for c in cs for t in ts]
    assert len(pairs) == len(set(pairs)) == result.forward_passes == 10 * 50 + 5 * 450
    evaluated = np.zeros((10, 500), bool)
    evaluated[tuple(np.array(pairs).T)] = True
    assert np.array_equal(np.isfinite(result.errors["l2"]), evaluated)
    assert result.winner == 3 and result.survivors[-1] == (3,)
    # survivors of round 1 are the 5 lowest means over round-1 trials
    assert set(result.survivors[0]) == set(np.argsort(table[:, first].mean(axis=1))[:5])


def test_elimination_averages_every_trial_evaluated_so_far():
    # 4-trial grid, [2, 4]/[2, 1]: round 1 evaluates trials 1, 3; round 2 adds 0, 2
    table = np.array([[2.0, 0.5, 2.0, 0.5],    # class 0: good early, bad later (mean 1.25)
                      [1.0, 0.6, 1.0, 0.6],    # class 1: mean 0.8 -> wins
                      [0.0, 0.7, 0.0, 0.7]])   # class 2: eliminated in round 1
    result = adaptive_classify(lambda c, t: table[np.ix_(c, t)], 3, make_plan(4, T), Schedule((2, 4), (2, 1)))
    assert result.survivors == ((0, 1), (1,)) and result.winner == 1
    assert np.isnan(result.errors["l2"][2, [0, 2]]).all()


def test_adaptive_spends_fewer_passes_and_agrees_with_exhaustive_on_clear_margins():
    rng = np.random.default_rng(1)
    n_classes, n_trials, labels = 10, 500, np.arange(30) % 10
    tables = [synthetic_errors(rng, n_classes, n_trials, y) for y in labels]

    def error_fn(requests):
        return [tables[r.item][np.ix_(r.candidate_ids, r.trial_ids)] for r in requests]

    plan = make_plan(n_trials, T)
    adaptive = adaptive_classify_batch(error_fn, len(labels), n_classes, plan, Schedule((50, 500), (5, 1)))
    exhaustive = adaptive_classify_batch(error_fn, len(labels), n_classes, plan)
    assert [r.winner for r in adaptive] == [r.winner for r in exhaustive] == list(labels)
    assert all(r.forward_passes == 2750 for r in adaptive)
    assert all(r.forward_passes == 5000 for r in exhaustive)
    # the store's tensor re-scores to the same predictions
    stacked = np.stack([r.errors["l2"] for r in adaptive])
    assert np.array_equal(score(stacked, labels)["predictions"], labels)
    assert score(stacked, labels)["forward_passes"] == 2750 * len(labels)


def test_batch_driver_equals_one_sample_at_a_time():
    rng = np.random.default_rng(2)
    tables = [synthetic_errors(rng, 12, 100, y, margin=0.01, noise=0.1) for y in range(6)]
    plan, schedule = make_plan(100, T), Schedule((20, 50, 100), (6, 3, 1))
    batch = adaptive_classify_batch(
        lambda reqs: [tables[r.item][np.ix_(r.candidate_ids, r.trial_ids)] for r in reqs],
        6, 12, plan, schedule)
    for item, result in enumerate(batch):
        single = adaptive_classify(lambda c, t: tables[item][np.ix_(c, t)], 12, plan, schedule)
        assert single.winner == result.winner and single.survivors == result.survivors
        np.testing.assert_array_equal(single.errors["l2"], result.errors["l2"])


def test_every_loss_is_kept_and_the_configured_one_eliminates():
    rng = np.random.default_rng(3)
    l2, l1 = rng.random((5, 20)), rng.random((5, 20))
    l1[4] = 0.0  # class 4 is best under l1 only

    def error_fn(c, t):
        return {"l2": l2[np.ix_(c, t)], "l1": l1[np.ix_(c, t)]}

    plan = make_plan(20, T)
    by_l1 = adaptive_classify(error_fn, 5, plan, loss="l1")
    by_l2 = adaptive_classify(error_fn, 5, plan, loss="l2")
    assert by_l1.winner == 4 and by_l2.winner == int(l2.mean(axis=1).argmin())
    np.testing.assert_array_equal(by_l1.errors["l2"], l2)
    with pytest.raises(ConfigError, match="choose one of them"):
        adaptive_classify(error_fn, 5, plan, loss="huber")


def test_non_finite_errors_are_refused():
    with pytest.raises(ModelError, match="candidate 1, trial 0"):
        adaptive_classify(lambda c, t: np.where(np.array(c)[:, None] == 1, np.inf, 0.0) + np.zeros(len(t)),
                          3, make_plan(4, T))


def test_ties_go_to_the_lowest_candidate_index():
    result = adaptive_classify(lambda c, t: np.ones((len(c), len(t))), 4, make_plan(10, T),
                               Schedule((5, 10), (2, 1)))
    assert result.winner == 0


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
