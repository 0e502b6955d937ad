"""Probe heads and the one-pass trainer, on scikit-learn's digits (no downloads, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.probing.heads import HeadSpec, build_head, count_parameters
from pipeline.probing.training import (
    ArraySource,
    HeadJob,
    RunningMoments,
    TrainSpec,
    split_validation,
    train_heads,
)


@pytest.fixture(scope="module")
def digits():
    """(1797, 64) float32 pixels, labels, and the digits reader's split (test: i % 5 == 0)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    idx = np.arange(len(bunch.target))
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64), idx[idx % 5 != 0], idx[idx % 5 == 0]


class CountingSource:
    """Wraps a source and counts the minibatches it serves, by kind of pass."""

    def __init__(self, inner):
        self.inner = inner
        self.shapes, self.labels = inner.shapes, inner.labels
        self.shuffled_batches = 0
        self.ordered_batches = 0

    def iter_batches(self, indices, batch_size, *, keys, shuffle, seed, epoch):
        for batch in self.inner.iter_batches(
            indices, batch_size, keys=keys, shuffle=shuffle, seed=seed, epoch=epoch
        ):
            if shuffle:
                self.shuffled_batches += 1
            else:
                self.ordered_batches += 1
            yield batch


def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- accuracy --------------------------------------------------------------------------


def test_linear_head_within_two_points_of_sklearn_logistic_regression(digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y, train, test = digits
    scaler = StandardScaler().fit(x[train])
    reference = LogisticRegression(max_iter=5000).fit(scaler.transform(x[train]), y[train])
    sk_top1 = reference.score(scaler.transform(x[test]), y[test])

    source = ArraySource(x.reshape(-1, 64, 1, 1), y)  # 64 channels pooled to 1x1
    recipe = TrainSpec(
        "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="step", step_size=7, epochs=28
    )
    (result,) = train_heads(source, train, test, [HeadJob(HeadSpec("linear"), recipe)], val_fraction=0)
    assert sk_top1 > 0.9  # the reference itself is sane
    assert abs(result["top1"] - sk_top1) <= 0.02, (result["top1"], sk_top1)
    assert result["n_params"] == 64 * 10 + 10
    assert result["n_train"] == len(train) and result["n_test"] == len(test) and result["n_val"] == 0


def test_all_four_heads_beat_chance_by_a_wide_margin(digits):
    x, y, train, test = digits
    source = ArraySource(x.reshape(-1, 1, 8, 8), y)
    recipe = TrainSpec("adamw", lr=1e-2, epochs=15, patience=5)
    specs = [
        HeadSpec("linear"),
        HeadSpec("mlp", hidden=64, depth=1, dropout=0.1),
        HeadSpec("cnn", hidden=16, depth=2),
        HeadSpec("attention", width=32, depth=1, heads=2, mlp_ratio=2),
    ]
    jobs = [HeadJob(spec, recipe) for spec in specs]
    results = train_heads(source, train, test, jobs, batch_size=64, val_fraction=0.15)
    for spec, result in zip(specs, results):
        assert result["kind"] == spec.kind
        assert result["top1"] > 0.6, (spec.kind, result["top1"])  # chance is 0.1
        assert result["top1"] <= result["top5"] <= 1.0
        assert 1 <= result["epochs_run"] <= 15 and 0 <= result["best_epoch"] < result["epochs_run"]
        assert 0 < result["val_top1"] <= 1 and result["train_time_s"] > 0


# --- standardisation -------------------------------------------------------------------


def test_running_moments_match_numpy_in_float64():
    rng = np.random.default_rng(0)
    # Large offset, small spread: a naive float32 sum-of-squares loses it entirely.
    data = (1e4 + rng.standard_normal((1000, 3, 2, 2))).astype(np.float32)
    moments = RunningMoments((3, 2, 2))
    for start in range(0, 1000, 37):
        moments.update(data[start : start + 37])
    exact = data.astype(np.float64)
    np.testing.assert_allclose(moments.mean, exact.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.std(), exact.std(axis=0), rtol=1e-9)


def test_standardisation_uses_fitting_split_only(digits):
    x, y, train, test = digits
    x = x.reshape(-1, 64, 1, 1)
    poisoned = x.copy()
    poisoned[test] = 1e6  # test values must not leak into the statistics
    job = HeadJob(HeadSpec("linear"), TrainSpec(epochs=1))
    runs = [
        train_heads(ArraySource(data, y), train, test, [job], val_fraction=0.2, seed=3, return_models=True)[0]
        for data in (x, poisoned)
    ]
    fit, val = split_validation(train, 0.2, seed=3)
    expected_std = x[fit].astype(np.float64).std(axis=0)
    expected_std[expected_std == 0] = 1.0  # constant border pixels, as StandardScaler
    for result in runs:
        model = result["model"]
        np.testing.assert_allclose(model.mean.numpy(), x[fit].mean(axis=0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(1 / model.inv_std.numpy(), expected_std, rtol=1e-6)
    assert torch.equal(runs[0]["model"].mean, runs[1]["model"].mean)
    assert torch.equal(runs[0]["model"].inv_std, runs[1]["model"].inv_std)
    # The validation part of train is excluded too.
    assert not np.allclose(runs[0]["model"].mean.numpy(), x[train].mean(axis=0))


# --- one pass, many heads; reproducibility ---------------------------------------------


def test_one_pass_feeds_every_head_and_heads_do_not_interfere(digits):
    x, y, train, test = digits
    source = ArraySource(x.reshape(-1, 1, 8, 8), y)
    epochs, batch, eval_batch = 3, 50, 200
    target = HeadJob(HeadSpec("mlp", hidden=32, dropout=0.3), TrainSpec(lr=3e-3, epochs=epochs))
    others = [
        HeadJob(HeadSpec("linear"), TrainSpec("sgd", lr=0.05, schedule="step", epochs=epochs)),
        HeadJob(HeadSpec("linear"), TrainSpec("sgd", lr=0.01, schedule="step", epochs=epochs)),
        HeadJob(HeadSpec("cnn", hidden=8, dropout=0.2), TrainSpec(epochs=epochs)),
    ]
    counts = []
    results = []
    for jobs in ([target], [others[0], target, *others[1:]]):
        counting = CountingSource(source)
        results.append(
            train_heads(
                counting, train, test, jobs, batch_size=batch, eval_batch_size=eval_batch,
                val_fraction=0.1, seed=7, return_models=True,
            )
        )
        counts.append((counting.shuffled_batches, counting.ordered_batches))
    fit, val = split_validation(train, 0.1, seed=7)
    expected_shuffled = epochs * math.ceil(len(fit) / batch)
    expected_ordered = (
        math.ceil(len(fit) / eval_batch)  # statistics
        + epochs * math.ceil(len(val) / eval_batch)  # validation
        + math.ceil(len(test) / eval_batch)  # test
    )
    assert counts[0] == counts[1] == (expected_shuffled, expected_ordered)
    alone, grouped = results[0][0], results[1][1]
    # Same head, same seed: bit-identical whether trained alone or with three others.
    assert state_dicts_equal(alone["model"], grouped["model"])
    assert alone["top1"] == grouped["top1"] and alone["best_epoch"] == grouped["best_epoch"]
    # Two learning rates of the same head in one pass end up different.
    assert not state_dicts_equal(results[1][0]["model"], results[1][2]["model"])


def test_same_seed_is_bit_reproducible_and_seed_matters(digits):
    x, y, train, test = digits
    source = ArraySource(x.reshape(-1, 4, 4, 4), y)
    jobs = [
        HeadJob(HeadSpec("attention", width=16, heads=2, depth=1, dropout=0.1), TrainSpec(epochs=2)),
        HeadJob(HeadSpec("mlp", hidden=32, dropout=0.2), TrainSpec("sgd", lr=0.05, epochs=2)),
    ]
    subset = train[:600]

    def run(seed):
        return train_heads(source, subset, test, jobs, batch_size=64, seed=seed, return_models=True)

    first, second, other = run(0), run(0), run(1)
    for a, b, c in zip(first, second, other):
        assert state_dicts_equal(a["model"], b["model"])
        assert (a["top1"], a["top5"], a["val_top1"]) == (b["top1"], b["top5"], b["val_top1"])
        assert not state_dicts_equal(a["model"], c["model"])


def test_heads_trained_in_parallel_threads_match_a_lone_run(digits):
    """Two tasks in one process (a dask worker with 2 threads) share torch's generator."""
    from concurrent.futures import ThreadPoolExecutor

    x, y, train, test = digits
    source = ArraySource(x.reshape(-1, 4, 4, 4), y)
    jobs = [HeadJob(HeadSpec("mlp", hidden=32, dropout=0.3), TrainSpec(epochs=3)),
            HeadJob(HeadSpec("linear"), TrainSpec(epochs=3))]

    def run(seed):
        return train_heads(source, train[:500], test, jobs, batch_size=32, seed=seed, return_models=True)

    alone = {seed: run(seed) for seed in (0, 1)}
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, [0, 1, 0, 1]))
    for seed, results in zip([0, 1, 0, 1], together):
        for a, b in zip(alone[seed], results):
            assert state_dicts_equal(a["model"], b["model"]) and a["top1"] == b["top1"]


def test_heads_read_their_own_feature_slice_in_one_pass(digits):
    x, y, train, test = digits
    noise = np.random.default_rng(0).standard_normal((len(y), 64, 1, 1)).astype(np.float32)
    slices = {"t090": noise, "t150": x.reshape(-1, 64, 1, 1)}
    counting = CountingSource(ArraySource(slices, y))
    recipe = TrainSpec("sgd", lr=0.1, schedule="step", epochs=5)
    jobs = [HeadJob(HeadSpec("linear"), recipe, key) for key in slices]
    results = train_heads(counting, train, test, jobs, batch_size=64, val_fraction=0)
    assert [r["key"] for r in results] == ["t090", "t150"]
    assert results[0]["top1"] < 0.3 < 0.9 < results[1]["top1"]  # noise vs pixels
    assert counting.shuffled_batches == 5 * math.ceil(len(train) / 64)


def test_early_stopping_restores_best_validation_weights(digits):
    x, y, train, test = digits
    source = ArraySource(x.reshape(-1, 64, 1, 1), y)
    # A large learning rate oscillates, so validation accuracy stalls and patience runs out.
    recipe = TrainSpec("sgd", lr=5.0, momentum=0.9, schedule="constant", epochs=40, patience=2)
    job = HeadJob(HeadSpec("linear"), recipe)
    (result,) = train_heads(source, train, test, [job], val_fraction=0.2, seed=1, return_models=True)
    assert result["epochs_run"] < 40
    assert result["epochs_run"] == result["best_epoch"] + 1 + 2
    _, val = split_validation(train, 0.2, seed=1)
    with torch.inference_mode():
        predicted = result["model"](torch.from_numpy(x[val].reshape(-1, 64, 1, 1))).argmax(1).numpy()
    assert (predicted == y[val]).mean() == pytest.approx(result["val_top1"])


# --- validation split ------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    n_groups=st.integers(2, 40),
    views=st.integers(1, 4),
    fraction=st.floats(0.05, 0.9),
    seed=st.integers(0, 1000),
)
def test_validation_split_never_splits_a_group(n_groups, views, fraction, seed):
    groups = np.repeat(np.array([f"img{i}" for i in range(n_groups)], dtype=object), views)
    rng = np.random.default_rng(seed)
    train = np.sort(rng.choice(len(groups), size=max(2 * views, len(groups) * 3 // 4), replace=False))
    if len(np.unique(groups[train])) < 2:
        return
    fit, val = split_validation(train, fraction, seed, groups)
    assert len(fit) and len(val)
    assert np.array_equal(np.sort(np.concatenate([fit, val])), train)
    assert not set(groups[fit]) & set(groups[val])
    again = split_validation(train, fraction, seed, groups)
    assert np.array_equal(again[0], fit) and np.array_equal(again[1], val)


def test_train_heads_splits_validation_by_group(digits):
    x, y, train, test = digits
    groups = np.arange(len(y)) // 4  # four "views" per image
    (result,) = train_heads(
        ArraySource(x.reshape(-1, 64, 1, 1), y), train, test,
        [HeadJob(HeadSpec("linear"), TrainSpec(epochs=1))], val_fraction=0.25, groups=groups,
    )
    fit, val = split_validation(train, 0.25, 0, groups)
    assert (result["n_train"], result["n_val"]) == (len(fit), len(val))
    assert not set(groups[fit]) & set(groups[val])


# --- shapes and errors -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp", "cnn", "attention"])
@pytest.mark.parametrize("in_shape", [(8, 1, 1), (3, 2, 2), (4, 16, 16)])
def test_heads_map_pooled_maps_to_logits(kind, in_shape):
    spec = HeadSpec(kind, hidden=8, width=8, heads=2, depth=2)
    head = build_head(spec, in_shape, num_classes=7)
    out = head(torch.randn(5, *in_shape))
    assert out.shape == (5, 7) and torch.isfinite(out).all()
    assert count_parameters(head) > 0


def test_attention_head_has_cls_token_and_positions_per_token():
    head = build_head(HeadSpec("attention", width=16, heads=4, depth=3), (32, 16, 16), 10)
    assert head.pos.shape == (1, 256, 16) and head.cls.shape == (1, 1, 16)
    assert len(head.encoder.layers) == 3 and head.encoder.layers[0].self_attn.num_heads == 4
    # Positional embeddings make the head sensitive to where a feature sits.
    x = torch.randn(2, 32, 16, 16)
    head.eval()
    assert not torch.allclose(head(x), head(x.flip(-1)))


def test_bad_specs_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown head kind 'atention'.*did you mean 'attention'"):
        HeadSpec("atention")
    with pytest.raises(ConfigError, match="not a multiple of heads 3"):
        HeadSpec("attention", width=16, heads=3)
    with pytest.raises(ConfigError, match="depth must be an integer >= 1"):
        HeadSpec("mlp", depth=0)
    with pytest.raises(ConfigError, match="dropout"):
        HeadSpec("mlp", dropout=1.0)
    with pytest.raises(ConfigError, match=r"\(channels, y, x\)"):
        build_head(HeadSpec(), (64,), 10)
    with pytest.raises(ConfigError, match="num_classes >= 2"):
        build_head(HeadSpec(), (4, 2, 2), 1)
    with pytest.raises(ConfigError, match="unknown optimizer 'adam'"):
        TrainSpec("adam")
    with pytest.raises(ConfigError, match="unknown schedule"):
        TrainSpec(schedule="linear")
    with pytest.raises(ConfigError, match="patience"):
        TrainSpec(patience=0)


def test_bad_training_inputs_raise_config_errors(digits):
    x, y, train, test = digits
    source = ArraySource({"t150": x.reshape(-1, 64, 1, 1)}, y)
    job = HeadJob(HeadSpec("linear"), TrainSpec(epochs=1), key="t150")
    with pytest.raises(ConfigError, match="slice 't90', which the source lacks; valid: t150"):
        train_heads(source, train, test, [HeadJob(key="t90")])
    with pytest.raises(ConfigError, match="share 1 samples"):
        train_heads(source, train, np.append(test, train[0]), [job])
    with pytest.raises(ConfigError, match="groups has 3 entries"):
        train_heads(source, train, test, [job], groups=np.zeros(3))
    with pytest.raises(ConfigError, match="validation fraction"):
        train_heads(source, train, test, [job], val_fraction=1.0)
    with pytest.raises(ConfigError, match="expected \\(1797, C, p, p\\)"):
        ArraySource(x, y)
