"""The BatchSource contract, one suite run against every implementation.

As zarr-python's ``StoreTests`` does for stores: the in-memory ``ArraySource`` and the
streamed ``ZarrSource`` (helper process, helper thread) must behave the same to the
trainer, whatever their buffering. Data: sample i holds i at t=1 and -i at t=2, label
i % 4, so every batch can be checked row by row.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.probing.training import ArraySource
from pipeline.store import prefetch
from pipeline.store.source import ZarrSource

from helpers import synthetic_store

N, C, P = 300, 4, 2


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("src") / "s.zarr", n=N, channels=C, p=P)


@pytest.fixture(params=["array", "zarr-process", "zarr-thread"])
def source(request, store_path, monkeypatch):
    if request.param == "array":
        values = np.arange(N, dtype=np.float32)[:, None, None, None] * np.ones((1, C, P, P), np.float32)
        return ArraySource({"t1": values, "t2": -values}, np.arange(N) % 4)
    monkeypatch.setenv(prefetch.BUILDER_ENV, request.param.split("-")[1])
    # a buffer of ~1/5 of the slice, so the streamed source really streams
    return ZarrSource([store_path], [1, 2], buffer_bytes=2 * N * C * P * P * 4 // 5)


def _pass(source, idx, batch, shuffle, seed=0, epoch=0):
    rows, sizes = [], []
    for x, y in source.iter_batches(idx, batch, keys=["t1", "t2"], shuffle=shuffle, seed=seed, epoch=epoch):
        got = x["t1"][:, 0, 0, 0].astype(int)
        assert x["t1"].shape[1:] == (C, P, P) and np.issubdtype(x["t1"].dtype, np.floating)
        assert (x["t2"][:, 0, 0, 0] == -got).all(), "slices of one batch belong to the same samples"
        assert (y == got % 4).all(), "labels belong to their rows"
        rows += got.tolist()
        sizes.append(len(got))
    return rows, sizes


def test_shapes_and_labels(source):
    assert source.shapes["t1"] == (C, P, P) and source.shapes["t2"] == (C, P, P)
    assert np.array_equal(np.asarray(source.labels)[:N], np.arange(N) % 4)


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_pass_serves_each_index_once_in_full_batches(source, shuffle):
    idx = np.arange(0, N, 3)
    rows, sizes = _pass(source, idx, 16, shuffle)
    assert sorted(rows) == idx.tolist()
    assert all(s == 16 for s in sizes[:-1]) and 0 < sizes[-1] <= 16
    if not shuffle:
        assert rows == idx.tolist(), "an ordered pass keeps the caller's order"


def test_shuffled_order_depends_on_seed_and_epoch_only(source):
    idx = np.arange(N)
    first = _pass(source, idx, 32, True, seed=1, epoch=0)[0]
    assert _pass(source, idx, 32, True, seed=1, epoch=0)[0] == first
    assert _pass(source, idx, 32, True, seed=1, epoch=1)[0] != first
    assert _pass(source, idx, 32, True, seed=2, epoch=0)[0] != first
    assert first != sorted(first)
