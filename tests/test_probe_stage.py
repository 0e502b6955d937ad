"""The probe stage: against scikit-learn, splits by image, streaming, one read for many heads, retries."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from pipeline import store
from pipeline.config import load_workflow
from pipeline.errors import ConfigError, DiffprobeError, StoreError
from pipeline.heads import HeadSpec
from pipeline.runner import Runner
from pipeline.training import TrainSpec, split_validation
from pipeline.zarr_source import ZarrSource
from stages.probe import GroupTask, ProbeConfig, group_splits, plan_grid, split_by_image, train_group

from conftest import TINY_UNET
#: The paper's linear-probe recipe (SGD, momentum, step schedule), shortened.
SGD = TrainSpec("sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="step", step_size=15, epochs=40)



def extract_stage(name: str, split: str, limit: int, views: int) -> str:
    return f"""
  - name: {name}
    stage: extract
    model: {{config: tiny.json, null_class: 10}}
    dataset: {{reader: digits, split: {split}, limit: {limit}}}
    blocks: [down_blocks.1, mid_block]
    timesteps: [10, 100]
    conditioning: "null"
    views: {views}
    flip: true
    unit_samples: 64"""



@pytest.fixture(scope="module")
def wf(tmp_path_factory, cluster_address):
    """Digits train (2 views per image) and test extracts of a random tiny UNet, pooled to 1 and 2."""
    folder = tmp_path_factory.mktemp("probe")
    (folder / "tiny.json").write_text(json.dumps(TINY_UNET))
    (folder / "wf.yaml").write_text(
        f"name: probetest\noutput_dir: out\n"
        f'cluster: {{kind: address, address: "{cluster_address}", dashboard: false}}\nstages:'
        + extract_stage("tr", "train", 300, 2) + extract_stage("te", "test", 360, 1) + """
  - {name: ptr, stage: pool, input: tr, sizes: [1, 2]}
  - {name: pte, stage: pool, input: te, sizes: [1, 2]}
  - name: grid
    stage: probe
    input: ptr
    test_input: pte
    heads:
      - {name: linear, head: {kind: linear}, train: {optimizer: sgd, lr: 0.1, schedule: step, step_size: 5}}
      - {name: mlp, head: {kind: mlp, hidden: 64}}
      - {name: cnn, head: {kind: cnn, hidden: 16}}
      - {name: attention, head: {kind: attention, width: 32, heads: 4, depth: 1}, pools: [2]}
    train: {optimizer: adamw, lr: 0.003, schedule: cosine, epochs: 8}
  - name: small
    stage: probe
    input: ptr
    blocks: [mid_block]
    timesteps: [10]
    train: {epochs: 2}
""")
    workflow = load_workflow(folder / "wf.yaml")
    Runner(workflow, progress=False).run(until="pte")
    return workflow


def _paths(wf, name, block="mid_block", pool=2):
    return str(wf.stage(name).output), f"blocks/{block}/p{pool}/activations"


def _task(parts, timesteps, heads, **kw) -> GroupTask:
    settings = dict(num_classes=10, test_fraction=0.2, val_fraction=0.0, batch_size=32, eval_batch_size=512,
                    seed=0, buffer_bytes=64 << 20, torch_threads=1)
    settings.update(kw)
    return GroupTask("g", "b", 2, tuple(parts), tuple(timesteps), tuple(heads), **settings)


def test_linear_head_matches_sklearn_logistic_regression(wf):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    for block in ("down_blocks.1", "mid_block"):
        train, test = _paths(wf, "ptr", block), _paths(wf, "pte", block)
        rows = train_group(_task([train, test], [10, 100], [("linear", HeadSpec("linear"), SGD)]))
        for row in rows:
            features = []
            for path, array in (train, test):
                root = store.open_root(path)
                x = root[array][:, list(root["timestep"][:]).index(row["timestep"])].astype(np.float32)
                features.append((x.reshape(len(x), -1), root["label"][:]))
            (x_tr, y_tr), (x_te, y_te) = features
            scaler = StandardScaler().fit(x_tr)
            reference = LogisticRegression(max_iter=5000).fit(scaler.transform(x_tr), y_tr)
            expected = reference.score(scaler.transform(x_te), y_te)
            assert expected > 0.5  # the features carry the digit: a comparison worth making
            assert abs(row["top1"] - expected) <= 0.02, (block, row["timestep"], row["top1"], expected)
            assert row["n_test"] == len(y_te) == 360


def test_split_by_image_never_separates_views():
    rng = np.random.default_rng(1)
    ids = np.repeat([f"im{i}" for i in range(50)], 3)
    usable = rng.random(len(ids)) > 0.1
    train, test = split_by_image(ids, usable, 0.3, seed=4)
    assert not set(ids[train]) & set(ids[test])
    assert sorted(np.concatenate([train, test])) == list(np.flatnonzero(usable))
    assert len(set(ids[test])) == round(0.3 * len(set(ids[usable])))
    again, _ = split_by_image(ids, usable, 0.3, seed=4)
    other, _ = split_by_image(ids, usable, 0.3, seed=5)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_stage_splits_of_a_store_keep_views_together(wf):
    source = ZarrSource([_paths(wf, "ptr")], [10])
    assert (np.bincount(np.unique(source.image_ids, return_inverse=True)[1]) == 2).all()  # 2 views each
    train, test = group_splits(source, _task([_paths(wf, "ptr")], [10], []))
    assert not set(source.image_ids[train]) & set(source.image_ids[test])
    groups = np.unique(source.image_ids, return_inverse=True)[1]
    fit, val = split_validation(train, 0.1, 0, groups)
    assert not set(source.image_ids[fit]) & set(source.image_ids[val])
    cfg = ProbeConfig(input="ptr", test_input="ptr")
    with pytest.raises(ConfigError, match="shares 300 image"):
        plan_grid(cfg, wf.stage("ptr").output, wf.stage("ptr").output)


def test_one_read_feeds_many_heads(wf):
    parts = [_paths(wf, "ptr"), _paths(wf, "pte")]
    adam = TrainSpec("adamw", lr=3e-3, epochs=3)
    one = train_group(_task(parts, [10, 100], [("lin", HeadSpec("linear"), adam)], val_fraction=0.2))
    many = train_group(_task(parts, [10, 100], [
        ("lin", HeadSpec("linear"), adam),
        ("lin-fast", HeadSpec("linear"), TrainSpec("adamw", lr=3e-2, epochs=3)),
        ("mlp", HeadSpec("mlp", hidden=32), adam),
    ], val_fraction=0.2))
    assert len(one) == 2 and len(many) == 6
    assert one[0]["read_bytes"] == many[0]["read_bytes"]  # 3x the heads, the same reads
    same = [r for r in many if r["head"] == "lin"]
    for a, b in zip(one, same):
        fields = ("timestep", "top1", "val_top1", "best_epoch")
        assert [a[f] for f in fields] == [b[f] for f in fields]


def _synthetic(path, n=512, channels=16, p=4, failed=()):
    layout = store.plan_layout(n, {"b": (channels, p, p)}, [1, 2], unit_samples=64)
    samples = store.SampleTable([f"im{i}" for i in range(n)], [0] * n, [False] * n, [i % 4 for i in range(n)])
    store.create_store(path, layout, samples, list("abcd"), {"stage": "extract", "stage_hash": "x"})
    root = store.open_root(path, mode="r+")
    values = np.arange(n, dtype=np.float32)[:, None, None, None, None] * np.ones((1, 2, channels, p, p))
    values[:, 1] *= -1
    for u in range(layout.n_units):
        a, b = layout.unit_range(u)
        store.write_unit(root, layout, u, {"b": values[a:b].astype(np.float32)},
                         {i - a: "bad" for i in failed if a <= i < b})
    return str(path), "blocks/b/activations"


def test_zarr_source_streams_every_sample_once_within_its_buffer(tmp_path):
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


def test_training_from_a_store_larger_than_the_buffer_stays_within_it(tmp_path):
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


def test_probe_grid_trains_all_four_heads_and_writes_results(wf, capsys):
    import xarray as xr
    from click.testing import CliRunner

    from pipeline.cli import main

    Runner(wf, progress=False).run(only="grid")
    out = wf.stage("grid").output
    attrs = store.read_attrs(out)
    assert attrs["complete"] and attrs["stage"] == "probe" and attrs["failed"] == []
    ds = xr.open_zarr(out)
    assert dict(ds["accuracy"].sizes) == {"block": 2, "timestep": 2, "pool": 2, "head": 4}
    assert list(ds["head_kind"].values) == ["linear", "mlp", "cnn", "attention"]
    assert np.isnan(ds["accuracy"].sel(head="attention", pool=1)).all()  # limited to pool 2
    best = ds["accuracy"].max(["block", "timestep", "pool"])
    assert (best > 0.6).all(), best.values  # chance is 0.1
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "heatmap_attention.png", "heatmap_cnn.png", "heatmap_linear.png", "heatmap_mlp.png"]
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 2 * 2 * (3 + 4)  # cells in the grid
    assert "best linear: block" in capsys.readouterr().err
    result = CliRunner().invoke(main, ["results", str(out), "--top", "3"])
    assert result.exit_code == 0 and "best per head:" in result.output and "attention: block" in result.output


def test_failed_group_is_retried_once_and_reported(wf, monkeypatch, capsys):
    import pandas as pd
    import xarray as xr

    from pipeline.cluster import FAULT_ENV

    out = wf.stage("small").output
    monkeypatch.setenv(FAULT_ENV, "mid_block/p2")  # the first attempt fails
    Runner(wf, progress=False).run(only="small")
    attrs = store.read_attrs(out)
    assert attrs["complete"] and attrs["retried"][0]["group"] == "mid_block/p2"
    assert "injected fault" in attrs["retried"][0]["error"] and "retrying once" in capsys.readouterr().err
    table = pd.read_csv(out / "results.csv")
    assert set(table.loc[table["pool"] == 2, "status"]) == {"retried"}
    assert set(table.loc[table["pool"] == 1, "status"]) == {"ok"}

    monkeypatch.setenv(FAULT_ENV, "mid_block/p2:2")  # both attempts fail
    with pytest.raises(DiffprobeError, match=r"1 group\(s\) failed twice \(mid_block/p2: RuntimeError"):
        Runner(wf, force=True, progress=False).run(only="small")
    assert store.read_attrs(out)["complete"] is False
    acc = xr.open_zarr(out)["accuracy"].sel(head="linear", block="mid_block")
    assert np.isnan(acc.sel(pool=2)).all() and np.isfinite(acc.sel(pool=1)).all()
    from pipeline.results import format_results

    assert "FAILED mid_block/p2" in format_results(out)

    monkeypatch.delenv(FAULT_ENV)
    capsys.readouterr()
    Runner(wf, progress=False).run(only="small")  # resumes: only the failed group runs
    assert "1 group(s) to do" in capsys.readouterr().err
    assert store.read_attrs(out)["complete"]
    assert np.isfinite(xr.open_zarr(out)["accuracy"].sel(head="linear", block="mid_block")).all()
