"""Adaptive pooling: numpy vs torch vs a direct loop, and the dask wrapper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.probing.pooling import adaptive_pool, pool_bins, pool_dask, pooled_shape

SIZES = [(7, 3), (5, 2), (16, 16), (1, 1), (16, 2), (9, 4), (3, 5), (2, 7), (16, 1)]


def direct_pool(x: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Independent reference: one bin at a time, bounds from the textbook formula, float64."""
    h, w = x.shape[-2:]
    out = np.empty(x.shape[:-2] + (size, size), dtype=np.float64)
    for i in range(size):
        h0, h1 = math.floor(i * h / size), math.ceil((i + 1) * h / size)
        for j in range(size):
            w0, w1 = math.floor(j * w / size), math.ceil((j + 1) * w / size)
            block = x[..., h0:h1, w0:w1].astype(np.float64)
            out[..., i, j] = block.mean(axis=(-2, -1)) if mode == "avg" else block.max(axis=(-2, -1))
    return out


def torch_pool(x: np.ndarray, size: int, mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    lead = t.shape[:-2]
    t = t.reshape(-1, 1, *t.shape[-2:])
    fn = F.adaptive_avg_pool2d if mode == "avg" else F.adaptive_max_pool2d
    return fn(t, size).reshape(*lead, size, size).numpy()


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("hw,size", SIZES)
def test_matches_torch_and_direct_loop(hw, size, mode):
    rng = np.random.default_rng(hw * 100 + size)
    x = rng.standard_normal((3, 2, 4, hw, hw)).astype(np.float32)
    got = adaptive_pool(x, size, mode)
    assert got.shape == (3, 2, 4, size, size) == pooled_shape(x.shape, size)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, torch_pool(x, size, mode), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, direct_pool(x, size, mode), rtol=1e-6, atol=1e-6)


def test_non_divisible_bins_overlap_like_torch():
    starts, ends = pool_bins(7, 3)
    assert starts.tolist() == [0, 2, 4] and ends.tolist() == [3, 5, 7]
    starts, ends = pool_bins(2, 5)  # p > H: rows repeat
    assert starts.tolist() == [0, 0, 0, 1, 1] and ends.tolist() == [1, 1, 2, 2, 2]


def test_rectangular_maps():
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 11)).astype(np.float32)
    for mode in ("avg", "max"):
        np.testing.assert_allclose(adaptive_pool(x, 4, mode), torch_pool(x, 4, mode), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_float16_input_accumulates_in_float32(mode):
    rng = np.random.default_rng(1)
    # Large, offset values: a float16 running sum over 64x64 would overflow (max 65504).
    x = (rng.standard_normal((2, 3, 64, 64)) * 4 + 500).astype(np.float16)
    got = adaptive_pool(x, 2, mode)
    assert got.dtype == np.float32
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, direct_pool(x, 2, mode), rtol=1e-6)
    np.testing.assert_allclose(got, torch_pool(x.astype(np.float32), 2, mode), rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    size=st.integers(1, 14),
    mode=st.sampled_from(["avg", "max"]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_torch(lead, h, w, size, mode, seed):
    x = np.random.default_rng(seed).standard_normal((*lead, h, w)).astype(np.float32)
    got = adaptive_pool(x, size, mode)
    assert got.shape == tuple(lead) + (size, size)
    ref = torch_pool(x, size, mode) if lead else torch_pool(x[None], size, mode)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    if mode == "max":
        # Every output is one of the inputs, and bins cover every input, so the maximum survives.
        assert np.isin(got, x).all()
        assert got.max() == x.max()


def test_constant_maps_are_fixed_points():
    x = np.full((2, 5, 7), 3.25, dtype=np.float32)
    for mode in ("avg", "max"):
        np.testing.assert_array_equal(adaptive_pool(x, 3, mode), np.full((2, 3, 3), 3.25, np.float32))


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_dask_equals_numpy(mode):
    da = pytest.importorskip("dask.array")
    x = np.random.default_rng(2).standard_normal((10, 2, 3, 9, 9)).astype(np.float16)
    arr = da.from_array(x, chunks=(4, 1, 3, 9, 9))
    pooled = pool_dask(arr, 4, mode)
    assert pooled.shape == (10, 2, 3, 4, 4) and pooled.dtype == np.float32
    assert pooled.chunks[:3] == arr.chunks[:3]
    np.testing.assert_array_equal(pooled.compute(scheduler="sync"), adaptive_pool(x, 4, mode))


def test_dask_refuses_split_maps():
    da = pytest.importorskip("dask.array")
    arr = da.zeros((4, 3, 8, 8), chunks=(2, 3, 4, 8))
    with pytest.raises(ConfigError, match="whole maps per chunk"):
        pool_dask(arr, 2)


@pytest.mark.parametrize("size", [0, -1, 2.0, True])
def test_bad_size_is_a_config_error(size):
    with pytest.raises(ConfigError, match="pool size"):
        adaptive_pool(np.zeros((2, 4, 4), np.float32), size)


def test_bad_mode_and_shape_are_config_errors():
    with pytest.raises(ConfigError, match="unknown pooling mode 'mean'"):
        adaptive_pool(np.zeros((2, 4, 4), np.float32), 2, "mean")
    with pytest.raises(ConfigError, match="last two axes"):
        adaptive_pool(np.zeros((4,), np.float32), 2)
