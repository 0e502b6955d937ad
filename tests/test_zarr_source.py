"""ZarrSource: streamed passes within the buffer, and the window builders (helper process or thread)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


from pipeline.store import prefetch
from pipeline.errors import StoreError
from pipeline.store.source import ZarrSource

from helpers import synthetic_store as _synthetic


@pytest.fixture(params=["process", "thread"])
def builder_kind(request, monkeypatch):
    monkeypatch.setenv(prefetch.BUILDER_ENV, request.param)
    return request.param


def _kind(source: ZarrSource) -> str:
    return "process" if isinstance(source._window_builder, prefetch.ProcessBuilder) else "thread"


def test_zarr_source_streams_every_sample_once_within_its_buffer(tmp_path, builder_kind):
    part = _synthetic(tmp_path / "s.zarr", n=1024, failed=(5,))
    small = 16 << 10
    source = ZarrSource([part], [1, 2], buffer_bytes=small)
    assert source.shapes == {"t1": (16, 4, 4), "t2": (16, 4, 4)} and not source.usable[5]
    idx = np.flatnonzero(source.usable)[::2]
    orders = []
    for epoch in (0, 0, 1):
        seen = []
        for x, y in source.iter_batches(idx, 32, keys=["t1", "t2"], shuffle=True, seed=3, epoch=epoch):
            rows = x["t1"][:, 0, 0, 0].astype(int)
            assert len(rows) <= 32 and (x["t2"][:, 0, 0, 0] == -rows).all() and (y == rows % 4).all()
            seen += rows.tolist()
        assert sorted(seen) == idx.tolist()
        orders.append(seen)
    assert orders[0] == orders[1] != orders[2] and orders[0] != idx.tolist()
    assert _kind(source) == builder_kind
    ordered = [x["t1"][:, 0, 0, 0] for x, _ in source.iter_batches(idx[::-1], 100, keys=["t1"], shuffle=False,
                                                                     seed=0, epoch=0)]
    assert np.concatenate(ordered).astype(int).tolist() == idx[::-1].tolist()
    slab = 64 * 16 * 16 * 2 * 2  # one 64-sample chunk of both keys, float16
    assert source.peak_buffer_bytes <= 2 * small + 2 * slab
    with pytest.raises(StoreError, match="not written"):
        next(source.iter_batches([4, 5], 2, keys=["t1"], shuffle=False, seed=0, epoch=0))
    val = idx[:8]  # 8 KiB of both keys: kept after one read, though the slice is 64x the buffer
    before = source.bytes_read
    for epoch in range(3):
        got = [int(v) for x, _ in source.iter_batches(val, 8, keys=["t1", "t2"], shuffle=epoch > 0, seed=0,
                                                      epoch=epoch) for v in x["t1"][:, 0, 0, 0]]
        assert sorted(got) == val.tolist()
    assert source.bytes_read - before == slab  # the one slab holding them, read once
    resident = ZarrSource([part], [1, 2])  # 2 MiB slice < the default buffer: decoded once
    for epoch in range(3):
        got = sorted(int(v) for x, _ in resident.iter_batches(idx, 32, keys=["t2"], shuffle=True, seed=0,
                                                              epoch=epoch) for v in -x["t2"][:, 0, 0, 0])
        assert got == idx.tolist()
    assert resident.bytes_read == 1024 * 2 * 16 * 4 * 4 * 2  # float16, every key once


def test_training_from_a_store_larger_than_the_buffer_stays_within_it(tmp_path, monkeypatch):
    # Thread builder: tracemalloc sees every allocation of the pass in this process.
    monkeypatch.setenv(prefetch.BUILDER_ENV, "thread")
    part = _synthetic(tmp_path / "big.zarr", n=4096)  # 4 MiB per timestep
    source = ZarrSource([part], [1], buffer_bytes=128 << 10)
    idx = np.arange(4096)
    list(source.iter_batches(idx[:64], 32, keys=["t1"], shuffle=True, seed=0, epoch=0))  # warm imports
    tracemalloc.start()
    try:
        for _ in source.iter_batches(idx, 32, keys=["t1"], shuffle=True, seed=0, epoch=1):
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (4 << 20) / 4, f"peak {peak / 2**20:.2f} MiB while streaming a 4 MiB slice"



def _passes(source, idx, keys):
    """Every batch of a shuffled epoch 0, epoch 1 and an ordered pass over reversed positions."""
    out = []
    for shuffle, epoch, positions in ((True, 0, idx), (True, 1, idx), (False, 0, idx[::-1])):
        for x, y in source.iter_batches(positions, 48, keys=keys, shuffle=shuffle, seed=7, epoch=epoch):
            out.append(({k: v.copy() for k, v in x.items()}, y.copy()))
    return out


def test_process_and_thread_builders_serve_identical_batches(tmp_path, monkeypatch):
    part = _synthetic(tmp_path / "s.zarr", n=1024)
    idx = np.arange(3, 1000, 3)
    runs = {}
    for kind in ("process", "thread"):
        monkeypatch.setenv(prefetch.BUILDER_ENV, kind)
        with ZarrSource([part], [1, 2], buffer_bytes=24 << 10) as source:
            runs[kind] = _passes(source, idx, ["t2", "t1"])
            assert _kind(source) == kind
            reads = source.bytes_read
        assert source._window_builder is None  # closed by the with block
        runs[kind + "_reads"] = reads
    assert runs["process_reads"] == runs["thread_reads"]
    assert len(runs["process"]) == len(runs["thread"])
    for (xa, ya), (xb, yb) in zip(runs["process"], runs["thread"]):
        np.testing.assert_array_equal(ya, yb)
        for k in ("t1", "t2"):
            np.testing.assert_array_equal(xa[k], xb[k])
    rows = np.concatenate([x["t1"][:, 0, 0, 0] for x, _ in runs["process"]]).astype(int)
    assert sorted(rows[:len(idx)]) == idx.tolist()  # epoch 0: every position once
    assert rows[-len(idx):].tolist() == idx[::-1].tolist()  # the ordered pass keeps the order asked


def test_the_next_epochs_first_windows_are_built_ahead(tmp_path, monkeypatch):
    monkeypatch.setenv(prefetch.BUILDER_ENV, "process")
    part = _synthetic(tmp_path / "s.zarr", n=1024)
    idx = np.arange(1024)
    with ZarrSource([part], [1], buffer_bytes=64 << 10) as source:
        first = [y for _, y in source.iter_batches(idx, 64, keys=["t1"], shuffle=True, seed=0, epoch=0)]
        builder = source._window_builder
        guesses = builder._ahead[0]
        assert len(guesses) == 2 and source._next_pass[0][-1] == 1  # epoch 1's first two windows
        second = [y for _, y in source.iter_batches(idx, 64, keys=["t1"], shuffle=True, seed=0, epoch=1)]
        # A pass nobody guessed (an ordered one) waits for the guesses, drops them and reads right.
        ordered = np.concatenate([x["t1"][:, 0, 0, 0] for x, _ in source.iter_batches(
            idx, 100, keys=["t1"], shuffle=False, seed=0, epoch=0)])
    assert ordered.astype(int).tolist() == idx.tolist()
    assert sorted(np.concatenate(second).tolist()) == sorted(np.concatenate(first).tolist())
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))


def test_a_killed_or_failing_window_reader_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(prefetch.BUILDER_ENV, "process")
    part = _synthetic(tmp_path / "s.zarr", n=1024)
    idx = np.arange(1024)
    with ZarrSource([part], [1], buffer_bytes=16 << 10) as source:
        batches = source.iter_batches(idx, 32, keys=["t1"], shuffle=True, seed=0, epoch=0)
        next(batches)
        os.kill(source._window_builder.process.pid, signal.SIGKILL)
        with pytest.raises(StoreError, match=r"window reader process died .*DIFFPROBE_WINDOW_READER=thread"):
            for _ in batches:
                pass
    # A damaged chunk: the helper's error comes back as the error of the pass.
    shard = next(p for p in sorted(Path(part[0], "blocks/b/activations/c").rglob("*")) if p.is_file())
    shard.write_bytes(shard.read_bytes()[:100])
    with ZarrSource([part], [1], buffer_bytes=16 << 10) as source:
        with pytest.raises(StoreError, match="reading the store failed in the window reader"):
            list(source.iter_batches(idx, 32, keys=["t1"], shuffle=False, seed=0, epoch=0))
        assert source._window_builder.process.is_alive()  # still serving: the next pass reads again
    assert not [p for p in multiprocessing.active_children() if p.name == "diffprobe-block-reader"]


def test_daemonic_processes_and_a_bad_setting_fall_back_or_fail_clearly(monkeypatch):
    monkeypatch.delenv(prefetch.BUILDER_ENV, raising=False)
    assert prefetch.process_allowed()
    monkeypatch.setitem(multiprocessing.current_process()._config, "daemon", True)  # as in a dask nanny's worker
    assert not prefetch.process_allowed()
    monkeypatch.setenv(prefetch.BUILDER_ENV, "fork")
    with pytest.raises(StoreError, match="must be 'thread' or 'process'"):
        prefetch.process_allowed()


@pytest.fixture(scope="module")
def store_512(tmp_path_factory):
    return _synthetic(tmp_path_factory.mktemp("prop") / "s.zarr", n=512)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(buffer_kib=st.integers(1, 160), batch=st.integers(1, 97), keep=st.floats(0.05, 1.0),
       shuffle=st.booleans(), seed=st.integers(0, 3), reverse=st.booleans())
def test_any_buffer_and_batch_serve_each_position_once_in_full_batches(
        store_512, monkeypatch, buffer_kib, batch, keep, shuffle, seed, reverse):
    monkeypatch.setenv(prefetch.BUILDER_ENV, "thread")  # same plans as the process; no fork per example
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(rng.random(512) < keep)
    if not len(idx):
        return
    idx = idx[::-1] if reverse else idx
    source = ZarrSource([store_512], [1, 2], buffer_bytes=buffer_kib << 10)
    got, sizes = [], []
    for x, y in source.iter_batches(idx, batch, keys=["t1", "t2"], shuffle=shuffle, seed=seed, epoch=0):
        rows = x["t1"][:, 0, 0, 0].astype(int)
        assert (x["t2"][:, 0, 0, 0] == -rows).all() and (y == rows % 4).all()
        got += rows.tolist()
        sizes.append(len(rows))
    assert sorted(got) == sorted(idx.tolist())
    assert all(s == batch for s in sizes[:-1]) and 0 < sizes[-1] <= batch
    if not shuffle:
        assert got == idx.tolist()
