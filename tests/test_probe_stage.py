"""The probe stage: against scikit-learn, splits by image, streaming, one read for many heads, retries."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import store
from pipeline.workflow.config import load_workflow
from stages import STAGES
from pipeline.errors import ConfigError, DiffprobeError
from pipeline.probing.heads import HeadSpec
from pipeline.workflow.runner import Runner
from pipeline.probing.training import TrainSpec, split_validation
from pipeline.store.source import ZarrSource
from stages.probe import GroupTask, ProbeConfig, group_splits, build_grid, split_by_image, train_group

from helpers import TINY_UNET
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
    workflow = load_workflow(folder / "wf.yaml", STAGES)
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
        build_grid(cfg, wf.stage("ptr").output, wf.stage("ptr").output)


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


def test_probe_grid_trains_all_four_heads_and_writes_results(wf, capsys):
    import xarray as xr
    from click.testing import CliRunner

    from pipeline.cli.commands import main

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

    from pipeline.faults import FAIL_TASKS_ENV as FAULT_ENV

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
    from pipeline.probing.results import format_results

    assert "FAILED mid_block/p2" in format_results(out)

    monkeypatch.delenv(FAULT_ENV)
    capsys.readouterr()
    Runner(wf, progress=False).run(only="small")  # resumes: only the failed group runs
    assert "1 group(s) to do" in capsys.readouterr().err
    assert store.read_attrs(out)["complete"]
    assert np.isfinite(xr.open_zarr(out)["accuracy"].sel(head="linear", block="mid_block")).all()


def test_shard_is_refused_for_stages_that_would_run_whole_in_every_shard(wf):
    with pytest.raises(ConfigError, match=r"--shard splits only extract and classify stages; 'grid' \(probe\)"):
        Runner(wf, shard=(1, 2), progress=False).run(only="grid")
    report = Runner(wf, shard=(1, 2), progress=False).run(until="te", dry_run=True)  # extracts only: fine
    assert [name for name, _ in report] == ["tr", "te"]


def test_plan_says_whether_each_slice_fits_the_buffer(wf):
    from dataclasses import replace

    from stages.probe import ProbeStage

    runner = Runner(wf, progress=False)
    entry = wf.stage("small")
    rows = dict(ProbeStage().plan(entry.config, runner.context(entry)))
    assert "every task decodes its slice once" in rows["memory"]
    tight = replace(entry.config, buffer_mib=0.001)
    rows = dict(ProbeStage().plan(tight, runner.context(entry)))
    assert "2 of 2 task(s) stream" in rows["memory"] and "buffer_mib: 0.08 or more" in rows["memory"]
