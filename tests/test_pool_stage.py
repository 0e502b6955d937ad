"""The pool stage: numbers against a direct numpy computation, failed samples, bounded memory."""

from __future__ import annotations

import json
import textwrap
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

from pipeline import store
from pipeline.store.failures import read_failed_images
from pipeline.workflow.config import ClusterConfig, StageEntry, Workflow, load_workflow
from stages import STAGES
from pipeline.errors import ConfigError
from pipeline.workflow.runner import Runner
from pipeline.workflow.stage import RunContext
from stages.pool import PoolConfig, PoolStage, pool_unit

from helpers import TINY_UNET



@pytest.fixture(scope="module")
def pooled(tmp_path_factory, cluster_address):
    """Extract (2 views, flips, maps 8x8) then pool avg to 1, 3, 5 and max to 2, 3 (float32)."""
    folder = tmp_path_factory.mktemp("pool")
    (folder / "tiny.json").write_text(json.dumps(TINY_UNET))
    (folder / "wf.yaml").write_text(textwrap.dedent(f"""\
        name: pooltest
        output_dir: out
        cluster: {{kind: address, address: "{cluster_address}", dashboard: false}}
        stages:
          - name: ex
            stage: extract
            model: {{config: tiny.json, null_class: 10}}
            dataset: {{reader: digits, split: all, limit: 40}}
            blocks: [down_blocks.1, mid_block]
            timesteps: [10, 100]
            conditioning: "null"
            views: 2
            flip: true
            unit_samples: 32
          - name: avg
            stage: pool
            input: ex
            sizes: [1, 3, 5]
          - name: mx
            stage: pool
            input: ex
            sizes: [2, 3]
            mode: max
            blocks: [mid_block]
            timesteps: [100]
            dtype: float32
        """))
    wf = load_workflow(folder / "wf.yaml", STAGES)
    Runner(wf, progress=False).run()
    return wf


def naive_pool(x: np.ndarray, p: int, mode: str) -> np.ndarray:
    """Adaptive pooling written out bin by bin (torch's bins: [floor(iH/p), ceil((i+1)H/p)))."""
    h, w = x.shape[-2:]
    out = np.empty(x.shape[:-2] + (p, p))
    for i in range(p):
        for j in range(p):
            rows = slice((i * h) // p, -(-(i + 1) * h // p))
            cols = slice((j * w) // p, -(-(j + 1) * w // p))
            win = x[..., rows, cols].astype(np.float64)
            out[..., i, j] = win.mean(axis=(-2, -1)) if mode == "avg" else win.max(axis=(-2, -1))
    return out


def test_pooled_store_matches_numpy_pooling_of_the_source(pooled):
    src = store.open_root(pooled.stage("ex").output)
    avg = store.open_root(pooled.stage("avg").output)
    mx = store.open_root(pooled.stage("mx").output)
    for block in ("down_blocks.1", "mid_block"):
        maps = src[f"blocks/{block}/activations"][:]
        assert maps.shape[-2:] == (8, 8)  # so 3 and 5 are non-divisible sizes
        for p in (1, 3, 5):
            got = avg[f"blocks/{block}/p{p}/activations"][:]
            assert got.shape == maps.shape[:3] + (p, p) and got.dtype == np.float16
            np.testing.assert_allclose(got, naive_pool(maps, p, "avg"), rtol=2e-3, atol=2e-3)
    maps = src["blocks/mid_block/activations"][:, 1]  # timestep 100 only
    for p in (2, 3):
        got = mx[f"blocks/mid_block/p{p}/activations"][:]
        assert got.shape == (maps.shape[0], 1, 16, p, p) and got.dtype == np.float32
        np.testing.assert_array_equal(got[:, 0], naive_pool(maps, p, "max").astype(np.float32))
    assert list(mx["timestep"][:]) == [100]


def test_pooled_store_keeps_coords_provenance_and_opens_cleanly(pooled):
    import xarray as xr

    src_path, out_path = pooled.stage("ex").output, pooled.stage("avg").output
    src, out = store.open_root(src_path), store.open_root(out_path)
    for coord in ("image_id", "view", "flipped", "label", "done", "class_name", "timestep"):
        np.testing.assert_array_equal(out[coord][:], src[coord][:])
    attrs = store.read_attrs(out_path)
    assert attrs["complete"] and attrs["source"]["stage_hash"] == store.read_attrs(src_path)["stage_hash"]
    assert attrs["pooled"] == {"mode": "avg", "sizes": [1, 3, 5], "blocks": ["down_blocks.1", "mid_block"]}
    chunks = out["blocks/mid_block/p3/activations"].chunks
    assert chunks[0] > 1 and chunks[1:] == (1, 16, 3, 3)  # sample-major, whole maps
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(out_path, engine="zarr")
        ds = xr.open_zarr(out_path, group="blocks/mid_block/p5")
    assert "p5" in tree["blocks/mid_block"].children
    assert ds["activations"].dims == store.DIMS and ds.sizes["y"] == 5


def _synthetic_source(path: Path, n: int, unit: int, failed: dict[int, str]) -> store.Layout:
    layout = store.make_layout(n, {"b": (32, 16, 16)}, [5, 50], unit_samples=unit)
    ids = [f"img{i // 2}" for i in range(n)]
    samples = store.SampleTable(ids, [i % 2 for i in range(n)], [False] * n, [i % 3 for i in range(n)])
    store.create_store(path, layout, samples, ["a", "b", "c"], {"stage": "extract", "stage_hash": "src"})
    root = store.open_root(path, mode="r+")
    rng = np.random.default_rng(0)
    for u in range(layout.n_units):
        start, stop = layout.unit_range(u)
        data = rng.standard_normal((stop - start, 2, 32, 16, 16)).astype(np.float16)
        mine = {i - start: r for i, r in failed.items() if start <= i < stop}
        data[list(mine)] = np.nan
        store.write_unit(root, layout, u, {"b": data}, mine)
    assert store.finalize(path)
    return layout


def _context(tmp_path: Path, cfg: PoolConfig, source: Path, output: Path) -> RunContext:
    entry = StageEntry("p", "pool", cfg, {"input": "src"}, output, 1)
    wf = Workflow("t", tmp_path / "wf.yaml", tmp_path, tmp_path, ClusterConfig(), (entry,))
    return RunContext(wf, entry, output, {"input": source}, "hash-p")


def test_pooling_memory_is_bounded_by_a_unit_and_failed_samples_stay_failed(tmp_path):
    source, output = tmp_path / "src.zarr", tmp_path / "pooled.zarr"
    failed = {3: "truncated JPEG", 70: "unreadable"}
    layout = _synthetic_source(source, n=512, unit=16, failed=failed)
    source_bytes = layout.bytes_per_sample() * layout.n_samples  # 16 MiB of float16 maps
    cfg = PoolConfig(input="src", sizes=(2, 7), mode="avg")
    stage = PoolStage()
    tasks = stage.prepare(cfg, _context(tmp_path, cfg, source, output))
    assert len(tasks) == 32
    results = [pool_unit(tasks[0])]  # imports and caches outside the measurement
    tracemalloc.start()
    try:
        results += [pool_unit(task) for task in tasks[1:]]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    unit_bytes = source_bytes // 32  # 512 KiB
    assert all(r["bytes_read"] == unit_bytes for r in results)
    # Loading the store would need >= 16 MiB; a task holds about one unit plus its float32 output.
    assert peak < 6 * unit_bytes < source_bytes / 4, f"peak {peak / 2**20:.1f} MiB for a 16 MiB store"
    assert store.finalize(output)
    out = store.open_root(output)
    done = out["done"][:]
    assert list(np.flatnonzero(done == store.FAILED)) == sorted(failed)
    assert [out["failure"][i] for i in sorted(failed)] == [failed[i] for i in sorted(failed)]
    values = out["blocks/b/p7/activations"][:]
    assert np.isnan(values[sorted(failed)]).all()
    assert np.isfinite(np.delete(values, sorted(failed), axis=0)).all()
    assert read_failed_images(output)[0]["image_id"] == "img1"
    assert stage.prepare(cfg, _context(tmp_path, cfg, source, output)) == []  # resume: nothing left


def test_unknown_block_names_the_valid_ones(tmp_path):
    source = tmp_path / "src.zarr"
    _synthetic_source(source, n=8, unit=8, failed={})
    cfg = PoolConfig(input="src", sizes=(2,), blocks=("c",))
    with pytest.raises(ConfigError, match=r"block 'c' is not in .*valid: b"):
        PoolStage().prepare(cfg, _context(tmp_path, cfg, source, tmp_path / "out.zarr"))
