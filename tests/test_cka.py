"""CKA estimators against independent formulas, their invariances, and their failure modes."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from pipeline.cka import estimators as cka


from pipeline.errors import ConfigError

PROPERTY = settings(max_examples=25, deadline=None)


# ----------------------------------------------------------- independent references


def kornblith_linear_cka(X, Y):
    """Kornblith et al. 2019, feature form, straight from the paper."""
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    X = X - X.mean(axis=0)
    Y = Y - Y.mean(axis=0)
    return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


def hsic0(K, L):
    """Biased HSIC_0 = tr(K H L H) / (n-1)^2 with an explicit centring matrix H."""
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def gram_form_cka(X, Y):
    K, L = X @ X.T, Y @ Y.T
    return hsic0(K, L) / math.sqrt(hsic0(K, K) * hsic0(L, L))


def song_hsic1(K, L):
    """Unbiased HSIC_1, Song et al. 2012, eq. 5: the trace formula (not the U-centred form)."""
    n = K.shape[0]
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0)
    np.fill_diagonal(Lt, 0)
    one = np.ones(n)
    return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ Kt @ Lt @ one) / (n * (n - 3))


def related_pair(rng, n, p1, p2, offset=5.0, noise=1.0):
    """X with non-zero feature means (centring matters) and Y a noisy linear image of X."""
    X = rng.standard_normal((n, p1)) + offset * rng.standard_normal(p1)
    Y = X @ rng.standard_normal((p1, p2)) + noise * rng.standard_normal((n, p2)) + offset
    return X, Y


def orthogonal(rng, p):
    q, r = np.linalg.qr(rng.standard_normal((p, p)))
    return q * np.sign(np.diag(r))


shapes = st.tuples(st.integers(0, 2**32 - 1), st.integers(5, 30), st.integers(1, 20), st.integers(1, 20))


# ------------------------------------------------------------- exact, streaming


@pytest.mark.parametrize("route", ["gram", "feature"])
@pytest.mark.parametrize("chunk_size", [1, 3, 16, None])
def test_streaming_exact_matches_kornblith(route, chunk_size):
    X, Y = related_pair(np.random.default_rng(0), n=60, p1=40, p2=90)
    expected = kornblith_linear_cka(X, Y)
    assert gram_form_cka(X, Y) == pytest.approx(expected, abs=1e-10)  # the two references agree
    got = cka.linear_cka(X, Y, route=route, chunk_size=chunk_size)
    assert got == pytest.approx(expected, abs=1e-6)
    assert 0.1 < expected < 0.99  # a value that discriminates, not a trivial 0 or 1


def test_auto_route_follows_memory_rule():
    assert cka.linear_route(1000, 50, 80) == "feature"
    assert cka.linear_route(100, 5000, 300) == "gram"
    assert cka.linear_route_bytes(10_000, 65_536, 65_536)["gram"] == 2 * 10_000**2 * 8
    # both dimensions below n but their co-moments bigger than the Grams: gram wins
    assert cka.linear_route(100, 90, 90) == "gram"


def test_partial_grams_add_up_in_any_order():
    X, _ = related_pair(np.random.default_rng(1), n=30, p1=50, p2=1)
    chunks = np.array_split(X, [7, 8, 31], axis=1)  # uneven, one of width 1
    parts = [cka.partial_gram(c) for c in chunks]
    Xc = X - X.mean(axis=0)
    np.testing.assert_allclose(sum(parts[::-1]), Xc @ Xc.T, rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(cka.gram_linear_chunks(iter(chunks)), Xc @ Xc.T, rtol=1e-10, atol=1e-8)


def test_gram_route_beyond_one_symmetrisation_block():
    # n > 1024: the Gram buffer is filled as an upper triangle and mirrored in blocks.
    X, Y = related_pair(np.random.default_rng(14), n=1100, p1=3, p2=4)
    assert cka.linear_cka(X, Y, route="gram") == pytest.approx(kornblith_linear_cka(X, Y), abs=1e-6)
    K = cka.partial_gram(X)
    np.testing.assert_array_equal(K, K.T)


def test_cka_from_chunk_iterables():
    X, Y = related_pair(np.random.default_rng(2), n=40, p1=25, p2=60)
    got = cka.linear_cka_from_chunks((X[:, j:j + 4] for j in range(0, 25, 4)),
                                     np.array_split(Y, 7, axis=1))
    assert got == pytest.approx(kornblith_linear_cka(X, Y), abs=1e-6)


def test_covariance_accumulators_merge_like_one_pass():
    X, Y = related_pair(np.random.default_rng(3), n=90, p1=6, p2=9, offset=100.0)
    parts = []
    for rows in np.array_split(np.arange(90), 4):
        acc = cka.CovarianceAccumulator(6, 9)
        acc.add(X[rows], Y[rows])
        parts.append(acc)
    parts[0].merge(parts[1])
    parts[2].merge(parts[3])
    parts[0].merge(parts[2])
    assert parts[0].n_samples == 90
    assert parts[0].cka() == pytest.approx(kornblith_linear_cka(X, Y), abs=1e-9)


def test_reads_chunks_from_a_zarr_array(tmp_path):
    zarr = pytest.importorskip("zarr")
    X, Y = related_pair(np.random.default_rng(4), n=20, p1=64, p2=64)
    zx = zarr.create_array(store=str(tmp_path / "x.zarr"), shape=X.shape, chunks=(20, 16), dtype="float16")
    zx[:] = X.astype(np.float16)
    expected = kornblith_linear_cka(X.astype(np.float16), Y)
    assert cka.linear_cka(zx, Y, chunk_size=16) == pytest.approx(expected, abs=1e-6)


def test_accumulator_refuses_wrong_feeding_and_missing_chunks():
    acc = cka.LinearCKAAccumulator(10, 100, 100)
    assert acc.route == "gram"
    with pytest.raises(RuntimeError, match="column chunks|row blocks"):
        acc.add_rows(np.ones((10, 100)), np.ones((10, 100)))
    acc.add_x_columns(np.random.default_rng(0).standard_normal((10, 60)))
    with pytest.raises(RuntimeError, match="60/100 X"):
        acc.result()


def test_memory_limit_refuses_with_a_fix():
    with pytest.raises(ConfigError, match="minibatch CKA"):
        cka.LinearCKAAccumulator(10_000, 65_536, 65_536, memory_limit_bytes=2**30)


def test_user_errors_name_the_problem():
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="12 samples but 10"):
        cka.linear_cka(rng.standard_normal((10, 3)), rng.standard_normal((12, 3)))
    with pytest.raises(ConfigError, match="NaN or inf"):
        cka.linear_cka(np.full((10, 3), np.nan), rng.standard_normal((10, 3)))
    with pytest.raises(ConfigError, match="samples"):
        cka.rbf_cka(rng.standard_normal((10, 3)), rng.standard_normal((9, 3)))
    with pytest.raises(ConfigError, match="samples"):
        cka.minibatch_cka(rng.standard_normal((10, 3)), rng.standard_normal((9, 3)), batch_size=5)


def test_constant_representation_gives_nan_with_a_warning():
    X = np.random.default_rng(0).standard_normal((10, 3))
    with pytest.warns(RuntimeWarning, match="constant"):
        assert math.isnan(cka.linear_cka(X, np.ones((10, 4))))


# ------------------------------------------------------------------- properties


@PROPERTY
@given(shapes, st.sampled_from(["gram", "feature"]))
def test_linear_cka_self_one_and_symmetric(shape, route):
    seed, n, p1, p2 = shape
    rng = np.random.default_rng(seed)
    X, Y = rng.standard_normal((n, p1)), rng.standard_normal((n, p2))
    assert cka.linear_cka(X, X, route=route) == pytest.approx(1.0, abs=1e-9)
    xy, yx = cka.linear_cka(X, Y, route=route), cka.linear_cka(Y, X, route=route)
    assert xy == pytest.approx(yx, abs=1e-9)
    assert -1e-12 <= xy <= 1 + 1e-12


@PROPERTY
@given(shapes, st.floats(1e-3, 1e3), st.booleans())
def test_linear_cka_invariant_to_rotation_and_isotropic_scaling(shape, scale, on_x):
    seed, n, p1, p2 = shape
    rng = np.random.default_rng(seed)
    X, Y = related_pair(rng, n, p1, p2)
    base = cka.linear_cka(X, Y)
    if on_x:
        X = scale * X @ orthogonal(rng, p1)
    else:
        Y = scale * Y @ orthogonal(rng, p2)
    assert cka.linear_cka(X, Y) == pytest.approx(base, abs=1e-8)


def test_linear_cka_not_invariant_to_general_invertible_map():
    # For isotropic X, CKA(X, XA) -> ||A||_F^2 / (sqrt(p) ||A^T A||_F): 0.45 for this A.
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 5))
    A = np.diag([1.0, 1.0, 1.0, 1.0, 20.0]) @ orthogonal(rng, 5)
    assert abs(np.linalg.det(A)) > 1  # invertible
    assert cka.linear_cka(X, X @ orthogonal(rng, 5)) == pytest.approx(1.0, abs=1e-12)
    assert cka.linear_cka(X, X @ A) < 0.6


@PROPERTY
@given(st.integers(0, 2**32 - 1), st.integers(4, 20))
def test_u_centring_equals_song_trace_formula(seed, n):
    rng = np.random.default_rng(seed)
    X, Y = rng.standard_normal((n, 3)), rng.standard_normal((n, 5))
    K, L = X @ X.T, Y @ Y.T
    assert cka.hsic_unbiased(K, L) == pytest.approx(song_hsic1(K, L), rel=1e-8, abs=1e-10)
    assert cka.hsic_unbiased(K, K) >= 0  # a squared norm of U(K): the sqrt is always defined


# ----------------------------------------------------------------- minibatch


def test_minibatch_hsic1_is_unbiased_over_all_batches_exactly():
    # HSIC_1 is a U-statistic of order 4 (Song et al. 2012): the mean of a kernel over
    # all 4-tuples of distinct samples. Averaging it over *every* size-b subset of the
    # n samples visits each 4-tuple equally often, so the average equals HSIC_1 of
    # the full set: the minibatch estimator is exactly unbiased for the full-data one
    # under uniform random batches. The biased HSIC_0 has no such property.
    rng = np.random.default_rng(5)
    X, Y = related_pair(rng, n=9, p1=3, p2=4, offset=0.0)
    K, L = X @ X.T, Y @ Y.T
    subsets = [list(s) for s in itertools.combinations(range(9), 5)]
    mean_u = np.mean([cka.hsic_unbiased(K[np.ix_(s, s)], L[np.ix_(s, s)]) for s in subsets])
    mean_b = np.mean([hsic0(K[np.ix_(s, s)], L[np.ix_(s, s)]) for s in subsets])
    assert mean_u == pytest.approx(cka.hsic_unbiased(K, L), rel=1e-10)
    assert abs(mean_b - hsic0(K, L)) > 0.05 * abs(hsic0(K, L))


def test_minibatch_hsic1_is_zero_in_expectation_for_independent_features():
    # Independent X and Y: population HSIC = 0, so E[HSIC_1] = 0, while HSIC_0 of a
    # batch is a squared norm of a noisy cross-covariance and stays positive.
    rng = np.random.default_rng(6)
    unbiased, biased = [], []
    for _ in range(400):
        x, y = rng.standard_normal((8, 3)), rng.standard_normal((8, 2))
        K, L = x @ x.T, y @ y.T
        unbiased.append(cka.hsic_unbiased(K, L))
        biased.append(hsic0(K, L))
    se = np.std(unbiased) / math.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 4 * se
    assert np.mean(biased) > 10 * np.std(biased) / math.sqrt(len(biased))


def test_minibatch_converges_to_exact_unbiased_cka():
    rng = np.random.default_rng(7)
    X, Y = related_pair(rng, n=600, p1=20, p2=30, noise=6.0)
    exact = cka.cka_from_grams(X @ X.T, Y @ Y.T, unbiased=True)
    errors = {}
    for b in (8, 30, 150, 600):
        values = [cka.minibatch_cka(X, Y, batch_size=b, seed=s).value for s in range(4)]
        errors[b] = float(np.mean(np.abs(np.array(values) - exact)))
    assert errors[600] < 1e-10  # one batch of everything is the full-data estimator
    assert errors[8] > errors[30] > errors[150] > errors[600]
    assert abs(exact - kornblith_linear_cka(X, Y)) < 0.05  # biased and unbiased agree at large n


def test_minibatch_records_batch_size_seed_and_count():
    X, Y = related_pair(np.random.default_rng(8), n=103, p1=4, p2=4)
    r = cka.minibatch_cka(X, Y, batch_size=10, seed=3, n_epochs=2)
    assert (r.batch_size, r.seed, r.n_epochs, r.n_batches) == (10, 3, 2, 20)
    assert r.to_dict()["value"] == r.value
    assert cka.minibatch_cka(X, Y, batch_size=10, seed=3, n_epochs=2).value == r.value
    assert cka.minibatch_cka(X, Y, batch_size=10, seed=4, n_epochs=2).value != r.value


def test_minibatch_refuses_small_or_changing_batches():
    rng = np.random.default_rng(0)
    acc = cka.MinibatchCKA()
    with pytest.raises(ConfigError, match="at least 4"):
        acc.update(rng.standard_normal((3, 2)), rng.standard_normal((3, 2)))
    with pytest.raises(ConfigError, match="at least 4"):
        cka.minibatch_cka(rng.standard_normal((10, 2)), rng.standard_normal((10, 2)), batch_size=2)
    acc.update(rng.standard_normal((6, 2)), rng.standard_normal((6, 2)))
    with pytest.raises(ConfigError, match="fixed batch size"):
        acc.update(rng.standard_normal((5, 2)), rng.standard_normal((5, 2)))
    with pytest.raises(ConfigError, match="same samples"):
        acc.update(rng.standard_normal((6, 2)), rng.standard_normal((5, 2)))


def test_minibatch_constant_representation_is_nan_with_note():
    rng = np.random.default_rng(0)
    acc = cka.MinibatchCKA()
    acc.update(rng.standard_normal((6, 2)), np.full((6, 3), 7.0))
    with pytest.warns(RuntimeWarning, match="constant"):
        r = acc.result()
    assert math.isnan(r.value) and "constant" in r.note


def test_minibatch_matrix_over_many_representations():
    rng = np.random.default_rng(9)
    reps = [rng.standard_normal((64, 5))]
    reps += [reps[0] @ rng.standard_normal((5, 7)) + s * rng.standard_normal((64, 7)) for s in (0.5, 3.0)]
    acc = cka.MinibatchCKA(n_representations=3)
    for i in range(0, 64, 16):
        acc.update(*(r[i:i + 16] for r in reps))
    m = acc.matrix()
    np.testing.assert_allclose(np.diag(m), 1.0)
    np.testing.assert_allclose(m, m.T)
    assert m[0, 1] > m[0, 2]  # the less noisy image of X is the more similar
    pair = cka.MinibatchCKA()
    for i in range(0, 64, 16):
        pair.update(reps[0][i:i + 16], reps[2][i:i + 16])
    assert pair.result().value == pytest.approx(m[0, 2], abs=1e-12)


# ------------------------------------------------------------------- float16


def test_float16_features_match_float32_and_never_overflow():
    # Stored features are float32 activations rounded to float16 (relative error
    # <= 2^-11). Stated tolerance: |CKA(fp16) - CKA(fp32)| <= 1e-3.
    rng = np.random.default_rng(10)
    n, p = 48, 6000
    X32 = (4 * rng.standard_normal((n, p))).astype(np.float32)
    Y32 = (X32[:, :200] @ rng.standard_normal((200, p)).astype(np.float32) / 10
           + 4 * rng.standard_normal((n, p)).astype(np.float32))
    X16, Y16 = X32.astype(np.float16), Y32.astype(np.float16)
    # ||x||^2 ~ 16 x 6000 = 96000 > 65504: a float16 Gram overflows ...
    with np.errstate(over="ignore"):
        assert np.isinf(X16 @ X16.T).any()
    # ... while the estimators upcast every chunk first.
    tol = 1e-3
    v16, v32 = cka.linear_cka(X16, Y16, route="gram", chunk_size=512), cka.linear_cka(X32, Y32)
    assert np.isfinite(v16) and abs(v16 - v32) <= tol
    assert 0.05 < v32 < 0.95
    f16, f32 = X16[:, :300], X32[:, :300]
    g16, g32 = Y16[:, :200], Y32[:, :200]
    assert abs(cka.linear_cka(f16, g16, route="feature") - cka.linear_cka(f32, g32)) <= tol
    mb16 = cka.minibatch_cka(X16, Y16, batch_size=16, seed=0).value
    mb32 = cka.minibatch_cka(X32, Y32, batch_size=16, seed=0).value
    assert abs(mb16 - mb32) <= tol
    assert abs(cka.rbf_cka(X16, Y16) - cka.rbf_cka(X32, Y32)) <= tol


# ------------------------------------------------------------------ Grams, RBF


def test_cka_matrix_matches_pairwise_values():
    rng = np.random.default_rng(11)
    reps = [rng.standard_normal((30, p)) for p in (3, 8, 20)]
    reps.append(reps[1] @ rng.standard_normal((8, 8)))
    grams = [r @ r.T for r in reps]
    for unbiased in (False, True):
        m = cka.cka_matrix(grams, unbiased=unbiased)
        for i, j in itertools.product(range(4), repeat=2):
            assert m[i, j] == pytest.approx(cka.cka_from_grams(grams[i], grams[j], unbiased), abs=1e-12)
        tile = cka.cka_matrix(grams[:2], grams[2:], unbiased=unbiased)
        np.testing.assert_allclose(tile, m[:2, 2:], atol=1e-12)


def test_gram_rbf_matches_reference_median_heuristic():
    X = np.random.default_rng(12).standard_normal((25, 4)) + 10
    d2 = cdist(X, X, "sqeuclidean")
    expected = np.exp(-d2 / (2 * 0.8**2 * np.median(d2)))
    np.testing.assert_allclose(cka.gram_rbf(X, sigma_fraction=0.8), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="sigma_fraction"):
        cka.gram_rbf(X, sigma_fraction=0)
    with pytest.raises(ConfigError, match="bandwidth is 0"):
        cka.gram_rbf(np.ones((6, 2)))


@PROPERTY
@given(shapes, st.floats(1e-2, 1e2), st.sampled_from([0.4, 1.0]))
def test_rbf_cka_sanity(shape, scale, fraction):
    seed, n, p1, p2 = shape
    rng = np.random.default_rng(seed)
    X, Y = related_pair(rng, n, p1, p2)
    v = cka.rbf_cka(X, Y, fraction)
    assert -1e-12 <= v <= 1 + 1e-12
    assert cka.rbf_cka(X, X, fraction) == pytest.approx(1.0, abs=1e-12)
    moved = scale * X @ orthogonal(rng, p1)
    assert cka.rbf_cka(moved, Y, fraction) == pytest.approx(v, abs=1e-8)


def test_no_warning_on_normal_use():
    X, Y = related_pair(np.random.default_rng(13), n=40, p1=5, p2=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cka.linear_cka(X, Y)
        cka.minibatch_cka(X, Y, batch_size=8)
        cka.rbf_cka(X, Y)
