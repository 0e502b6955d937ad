"""The cka stage: every entry against pipeline.cka.estimators on the stored arrays, across stores and layouts.

One module-scoped workflow extracts a tiny random UNet (float32 and float16), a
reference CNN (no timestep) and a pooled store, then runs cka stages on them
through an in-process dask cluster.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import types
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from helpers import TINY_UNET

from pipeline import store
from pipeline.cka.estimators import linear_cka
from pipeline.cka.estimators import minibatch_cka, rbf_cka
from pipeline.cka.results import open_cka
from pipeline.cka.select import align_samples, expand_selections
from pipeline.workflow.config import ClusterConfig, load_workflow
from stages import STAGES
from pipeline.errors import ConfigError, DiffprobeError
from pipeline.workflow.runner import Runner
from stages.cka import CKAConfig, CKATask, Selection, cka_tile, build_cka_work

REFERENCE_CNN = Path(__file__).resolve().parents[1] / "data" / "factories" / "reference_cnn.py"
#: float16 storage rounds each feature with relative error <= 2^-11 (~4.9e-4); CKA sums products
#: over p >= 1,000 features and n^2 sample pairs, so the independent rounding errors largely cancel
#: (observed: 4e-6 on this store). 1e-4 in absolute CKA is the stated bound.
FLOAT16_TOLERANCE = 1e-4



@pytest.fixture(scope="module")
def wf(tmp_path_factory, cluster_address):
    folder = tmp_path_factory.mktemp("cka")
    (folder / "tiny.json").write_text(json.dumps(TINY_UNET))
    unet = """model: {config: tiny.json, null_class: 10}
            dataset: {reader: digits, split: test, limit: 40}
            blocks: [down_blocks.1, mid_block]
            timesteps: [10, 100]
            conditioning: class
            unit_samples: 16"""
    ref = f"""stage: extract
            model: {{kind: factory, factory: "{REFERENCE_CNN}:reference_cnn",
                    options: {{image_size: 16, in_channels: 1, timestep_free: true}}}}
            blocks: [stem, layer2, avgpool]
            timesteps: [0]
            unit_samples: 16"""
    (folder / "wf.yaml").write_text(textwrap.dedent(f"""\
        name: ckatest
        output_dir: out
        cluster: {{kind: address, address: "{cluster_address}", dashboard: false}}
        stages:
          - name: ex32
            stage: extract
            dtype: float32
            {unet}
          - name: ex16
            stage: extract
            dtype: float16
            {unet}
          - name: ref
            {ref}
            dataset: {{reader: digits, split: test, limit: 40}}
          - name: ref30
            {ref}
            dataset: {{reader: digits, split: test, limit: 30}}
          - name: pooled
            stage: pool
            input: ex32
            sizes: [1, 2]
            dtype: float32
          - name: within32
            stage: cka
            selections: [{{input: ex32}}]
          - name: within16
            stage: cka
            selections: [{{input: ex16}}]
          - name: across
            stage: cka
            mode: across
            rows: [{{input: ex32, blocks: mid_block}}]
            cols: [{{input: ref}}]
          - name: mb
            stage: cka
            estimator: minibatch
            batch_size: 8
            seed: 3
            epochs: 2
            selections: [{{input: ex32}}, {{input: ref, blocks: [layer2]}}]
          - name: layouts
            stage: cka
            selections: [{{input: pooled, blocks: [mid_block], timesteps: [100]}},
                         {{input: ex32, blocks: [mid_block], timesteps: [100]}}]
          - name: stream
            stage: cka
            route: stream
            selections: [{{input: pooled, blocks: [mid_block], pool: 1}},
                         {{input: ex32, blocks: [mid_block], timesteps: [10]}}]
          - name: cached
            stage: cka
            memory_limit: 64KiB
            selections: [{{input: ex32}}]
          - name: rbf
            stage: cka
            estimator: rbf
            selections: [{{input: ref}}]
          - name: mismatched
            stage: cka
            mode: across
            rows: [{{input: ex32, blocks: mid_block, timesteps: 10}}]
            cols: [{{input: ref30}}]
          - name: rbf_too_big
            stage: cka
            estimator: rbf
            rbf_max_samples: 10
            selections: [{{input: ref}}]
          - name: resumable
            stage: cka
            memory_limit: 64KiB
            selections: [{{input: ex32}}]
          - name: overlap_stream
            stage: cka
            mode: across
            route: stream
            rows: [{{input: pooled, blocks: [mid_block], pool: 1}}]
            cols: [{{input: pooled, blocks: [mid_block], pool: 1}}, {{input: ex32, blocks: [mid_block], timesteps: [10]}}]
          - name: overlap_gram
            stage: cka
            mode: across
            rows: [{{input: pooled, blocks: [mid_block], pool: 1}}]
            cols: [{{input: pooled, blocks: [mid_block], pool: 1}}, {{input: ex32, blocks: [mid_block], timesteps: [10]}}]
        """))
    workflow = load_workflow(folder / "wf.yaml", STAGES)
    Runner(workflow, progress=False).run(until="rbf")
    return workflow


def stored(wf, stage: str, array_path: str, t_index: int) -> np.ndarray:
    """One slice of a store, flattened to (n, p) float64, read with plain zarr."""
    arr = zarr.open_group(str(wf.stage(stage).output), mode="r")[array_path][:, t_index]
    return arr.reshape(len(arr), -1).astype(np.float64)


def open_output(wf, stage: str) -> xr.DataArray:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # readers see no warnings
        return xr.open_zarr(wf.stage(stage).output)["cka"].load()


def test_within_store_matches_direct_linear_cka(wf):
    cka = open_output(wf, "within32")
    assert list(cka["row"].values) == ["ex32/down_blocks.1/t10", "ex32/down_blocks.1/t100",
                                       "ex32/mid_block/t10", "ex32/mid_block/t100"]
    assert list(cka["row_timestep"].values) == [10, 100, 10, 100]
    assert list(cka["row_pool"].values) == [8, 8, 8, 8]  # raw maps: their own side
    reps = [(f"blocks/{b}/activations", ti) for b in ("down_blocks.1", "mid_block") for ti in (0, 1)]
    for i, (pi, ti) in enumerate(reps):
        for j, (pj, tj) in enumerate(reps):
            direct = linear_cka(stored(wf, "ex32", pi, ti), stored(wf, "ex32", pj, tj))
            assert cka.values[i, j] == pytest.approx(direct, abs=1e-10)
    np.testing.assert_allclose(np.diag(cka.values), 1.0, atol=1e-12)
    np.testing.assert_array_equal(cka.values, cka.values.T)
    assert 0.3 < cka.values.min() < 0.999  # not a degenerate all-ones matrix

    out = wf.stage("within32").output
    attrs = store.read_attrs(out)
    assert attrs["complete"] and attrs["n_samples"] == 40 and attrs["cka"]["method"] == "gram"
    table = pd.read_csv(out / "cka.csv")
    assert len(table) == 16 and set(table.columns) >= {"row", "col", "cka", "row_block", "col_timestep"}
    assert (out / "cka.png").stat().st_size > 1000
    np.testing.assert_array_equal(open_cka(out).values, cka.values)
    assert attrs["summary"]["most_similar_col"]["ex32/mid_block/t10"][0] == "ex32/mid_block/t100"
    assert Runner(wf, progress=False).run(only="within32") == [("within32", "skip (up to date)")]


def test_float16_store_gives_float32_cka_within_tolerance(wf):
    c32, c16 = open_output(wf, "within32"), open_output(wf, "within16")
    assert zarr.open_group(str(wf.stage("ex16").output))["blocks/mid_block/activations"].dtype == np.float16
    np.testing.assert_allclose(c16.values, c32.values, atol=FLOAT16_TOLERANCE)


def test_across_stores_diffusion_vs_reference_cnn(wf):
    ref_root = zarr.open_group(str(wf.stage("ref").output), mode="r")
    assert ref_root["timestep"][:].tolist() == [0]  # a timestep-free network keeps a length-1 axis
    assert store.read_attrs(wf.stage("ref").output)["provenance"]["noise"]["applied"] is False
    cka = open_output(wf, "across")
    assert cka.shape == (2, 3)
    assert list(cka["col_block"].values) == ["stem", "layer2", "avgpool"]
    assert set(cka["row_stage"].values) == {"ex32"} and set(cka["col_stage"].values) == {"ref"}
    for i, ti in enumerate((0, 1)):
        for j, block in enumerate(("stem", "layer2", "avgpool")):
            direct = linear_cka(stored(wf, "ex32", "blocks/mid_block/activations", ti),
                                stored(wf, "ref", f"blocks/{block}/activations", 0))
            assert cka.values[i, j] == pytest.approx(direct, abs=1e-10)
    assert (wf.stage("across").output / "cka.png").exists()


def test_mismatched_image_ids_are_an_error_that_counts_them(wf):
    ids = {s: set(zarr.open_group(str(wf.stage(s).output))["image_id"][:].tolist())
           for s in ("ex32", "ref30")}
    only_ex, only_ref = sorted(ids["ex32"] - ids["ref30"]), sorted(ids["ref30"] - ids["ex32"])
    assert only_ex  # a limit draws its own subset: 40 vs 30 images differ in both directions
    pattern = (rf"{len(only_ex)} image id\(s\) only in \S*ex32.zarr \('{only_ex[0]}', .*\) and "
               rf"{len(only_ref)} only in \S*ref30.zarr \('{only_ref[0]}'")
    with pytest.raises(ConfigError, match=pattern):
        Runner(wf, progress=False).run(only="mismatched")


def test_minibatch_records_batch_size_and_seed_and_matches_pipeline_cka(wf):
    cka = open_output(wf, "mb")
    meta = store.read_attrs(wf.stage("mb").output)["cka"]
    assert (meta["estimator"], meta["batch_size"], meta["seed"], meta["epochs"]) == ("minibatch", 8, 3, 2)
    assert meta["n_batches"] == 2 * (40 // 8)
    x = stored(wf, "ex32", "blocks/down_blocks.1/activations", 1)
    y = stored(wf, "ref", "blocks/layer2/activations", 0)
    expected = minibatch_cka(x, y, batch_size=8, seed=3, n_epochs=2)
    assert cka.sel(row="ex32/down_blocks.1/t100", col="ref/layer2/t0").item() == pytest.approx(expected.value,
                                                                                               abs=1e-10)
    assert expected.n_batches == meta["n_batches"]


def test_pooled_and_extracted_layouts_in_one_matrix(wf):
    cka = open_output(wf, "layouts")
    assert list(cka["row"].values) == ["pooled/mid_block/t100/p1", "pooled/mid_block/t100/p2",
                                       "ex32/mid_block/t100"]
    p1 = stored(wf, "pooled", "blocks/mid_block/p1/activations", 1)
    raw = stored(wf, "ex32", "blocks/mid_block/activations", 1)
    assert p1.shape == (40, 16)
    assert cka.values[0, 2] == pytest.approx(linear_cka(p1, raw), abs=1e-10)


def test_stream_route_matches_the_gram_route(wf):
    cka = open_output(wf, "stream")
    meta = store.read_attrs(wf.stage("stream").output)["cka"]
    # 16 pooled features < n: co-moments; 1,024 raw features > n: Grams
    assert meta["method"] == "stream" and meta["routes"] == ["feature", "gram"]
    p1 = [stored(wf, "pooled", "blocks/mid_block/p1/activations", t) for t in (0, 1)]
    raw = stored(wf, "ex32", "blocks/mid_block/activations", 0)
    reps = [*p1, raw]
    for i in range(3):
        for j in range(3):
            assert cka.values[i, j] == pytest.approx(linear_cka(reps[i], reps[j]), abs=1e-10)


def test_gram_files_when_one_task_cannot_hold_every_gram(wf):
    # 64 KiB: a task holds three 40 x 40 float64 Grams, fewer than the 4 + 2 of one in-task tile,
    # and reads 102 of the 1,024 features per pass.
    out = wf.stage("cached").output
    assert store.read_attrs(out)["cka"]["method"] == "gram-cache"
    np.testing.assert_allclose(open_output(wf, "cached").values, open_output(wf, "within32").values,
                               atol=1e-12)
    assert not (out / "grams").exists()  # scratch Grams are deleted once the matrix is written


def test_a_task_that_fails_twice_leaves_nan_and_a_rerun_redoes_only_it(wf, monkeypatch, capsys):
    monkeypatch.setenv("DIFFPROBE_FAULT_FAIL_TASKS", "row-1:2")
    with pytest.raises(DiffprobeError, match=r"1 task\(s\) failed twice \(row-1: RuntimeError: injected"):
        Runner(wf, progress=False).run(only="resumable")
    out = wf.stage("resumable").output
    assert store.read_attrs(out)["complete"] is False
    partial = xr.open_zarr(out)["cka"].values
    assert np.isnan(partial[1, 2:]).all() and np.isnan(partial[2:, 1]).all() and np.isfinite(partial[0]).all()
    assert partial[1, 1] == 1.0  # the diagonal is no task's: CKA(X, X) = 1
    monkeypatch.delenv("DIFFPROBE_FAULT_FAIL_TASKS")
    capsys.readouterr()
    assert Runner(wf, progress=False).run(only="resumable") == [("resumable", "resume")]
    assert "1 to do" in capsys.readouterr().err
    np.testing.assert_allclose(open_output(wf, "resumable").values, open_output(wf, "within32").values,
                               atol=1e-12)


def test_rbf_matches_pipeline_cka_and_refuses_large_n(wf):
    cka = open_output(wf, "rbf")
    stem = stored(wf, "ref", "blocks/stem/activations", 0)
    pooled = stored(wf, "ref", "blocks/avgpool/activations", 0)
    assert cka.values[0, 2] == pytest.approx(rbf_cka(stem, pooled), abs=1e-10)
    with pytest.raises(ConfigError, match="rbf_max_samples=10"):
        Runner(wf, progress=False).run(only="rbf_too_big")


def test_unknown_block_names_the_valid_ones(wf):
    cfg = CKAConfig(selections=(Selection("ex32", blocks=("mid_blok",)),))
    with pytest.raises(ConfigError, match="did you mean 'mid_block'.*valid: down_blocks.1, mid_block"):
        build_cka_work(cfg, {"ex32": wf.stage("ex32").output}, ClusterConfig())


def test_a_run_builds_the_extract_model_once(extract_workflow, monkeypatch):
    """The minibatch batch_size check needs the input's image count before extract runs: it
    comes from the model and listing extract's validate built, not from a second build."""
    import pipeline.models

    builds = []
    real_load = pipeline.models.load_model

    def counting(cfg, *args, **kwargs):
        builds.append(cfg)
        return real_load(cfg, *args, **kwargs)

    monkeypatch.setattr(pipeline.models, "load_model", counting)
    wf = extract_workflow(dataset="{reader: digits, split: test, limit: 8}", blocks="[mid_block]", timesteps="[10]")
    wf.write_text(wf.read_text() + "  - {name: mb, stage: cka, estimator: minibatch, batch_size: 4, "
                  "selections: [{input: ex}]}\n")
    Runner(load_workflow(wf, STAGES), progress=False).run()
    assert len(builds) == 1
    assert open_cka(wf.parent / "out" / "mb.cka").shape == (1, 1)


def test_config_validation():
    with pytest.raises(ValueError, match="mode 'across' takes 'rows' and 'cols'"):
        CKAConfig(mode="across", selections=(Selection("a"),))
    with pytest.raises(ValueError, match="batch_size"):
        CKAConfig(selections=(Selection("a"),), batch_size=2)
    across = CKAConfig(mode="across", rows=(Selection("a"),), cols=(Selection("b"), Selection("a")))
    assert across.inputs == ("a", "b")  # the stages the selections name, each once


def test_failed_samples_are_dropped_from_every_store_and_ids_matched_not_positions(wf, tmp_path):
    ex = tmp_path / "ex.zarr"
    ref = tmp_path / "ref.zarr"
    shutil.copytree(wf.stage("ex32").output, ex)
    shutil.copytree(wf.stage("ref").output, ref)
    zarr.open_group(str(ex), mode="r+")["done"][3] = store.FAILED
    zarr.open_group(str(ref), mode="r+")["done"][7] = store.FAILED
    align = align_samples([ex, ref])
    assert align.n == 38 and align.n_excluded == 2
    keep = np.setdiff1d(np.arange(40), [3, 7])
    np.testing.assert_array_equal(align.positions[str(ex)], keep)

    sel = [types.SimpleNamespace(input=s, blocks=(b,), timesteps="all", pool="all")
           for s, b in (("ex", "mid_block"), ("ref", "layer2"))]
    reps = expand_selections(sel, {"ex": ex, "ref": ref})
    task = CKATask("t", (reps[0],), (reps[2],), False, "gram", (str(ex), str(ref)), 0, 1 << 30, 1 << 20,
                   "linear")
    value = cka_tile(task)["values"][0][0]
    x = stored(wf, "ex32", "blocks/mid_block/activations", 0)[keep]
    y = stored(wf, "ref", "blocks/layer2/activations", 0)[keep]
    assert value == pytest.approx(linear_cka(x, y), abs=1e-10)

    # Same ids in another order: rows are matched by image_id, not by position.
    root = zarr.open_group(str(ref), mode="r+")
    ids = np.asarray(root["image_id"][:], dtype=object)
    perm = np.random.default_rng(0).permutation(40)
    root["image_id"][:] = ids[perm]
    align = align_samples([ex, ref])
    ex_ids = np.asarray(zarr.open_group(str(ex))["image_id"][:], dtype=object)
    ref_ids = np.asarray(root["image_id"][:], dtype=object)
    np.testing.assert_array_equal(ex_ids[align.positions[str(ex)]], ref_ids[align.positions[str(ref)]])


def test_only_needed_entries_are_tasks_and_the_rest_are_implied(wf):
    """Across two overlapping selections: the diagonal (CKA(X, X) = 1) and the mirrored pair are not
    computed again, and every entry still equals a direct computation and the one-task Gram method."""
    cfg = wf.stage("overlap_stream").config
    paths = {name: wf.stage(name).output for name in cfg.inputs}
    plan = build_cka_work(cfg, paths, ClusterConfig())
    assert plan.method == "stream"
    assert sorted(t.name for t in plan.tasks) == ["r0_c1", "r0_c2", "r1_c2"]  # of 2 x 3 entries
    Runner(wf, progress=False).run(only="overlap_stream")
    Runner(wf, progress=False).run(only="overlap_gram")
    streamed, gram = open_output(wf, "overlap_stream"), open_output(wf, "overlap_gram")
    assert store.read_attrs(wf.stage("overlap_gram").output)["cka"]["method"] == "gram"
    assert list(streamed["col"].values) == ["pooled/mid_block/t10/p1", "pooled/mid_block/t100/p1",
                                            "ex32/mid_block/t10"]
    reps = [stored(wf, "pooled", "blocks/mid_block/p1/activations", t) for t in (0, 1)]
    cols = [*reps, stored(wf, "ex32", "blocks/mid_block/activations", 0)]
    for i in range(2):
        for j in range(3):
            assert streamed.values[i, j] == pytest.approx(linear_cka(reps[i], cols[j]), abs=1e-10)
    np.testing.assert_allclose(streamed.values, gram.values, atol=1e-12)
    assert streamed.values[0, 0] == streamed.values[1, 1] == 1.0
    assert streamed.values[1, 0] == streamed.values[0, 1]
    assert not (wf.stage("overlap_stream").output / "grams").exists()  # the saved alignment went too


def test_tasks_load_the_planned_alignment_instead_of_matching_ids_again(wf, tmp_path, monkeypatch):
    from pipeline.cka import select as cka_select

    cfg = wf.stage("stream").config
    paths = {name: wf.stage(name).output for name in cfg.inputs}
    plan = build_cka_work(cfg, paths, ClusterConfig(), alignment_file=tmp_path / "alignment.npz")
    saved = cka_select.load_alignment(tmp_path / "alignment.npz")
    assert saved.keys() == plan.align.positions.keys()
    for path, positions in plan.align.positions.items():
        np.testing.assert_array_equal(saved[path], positions)
        assert saved[path].dtype == np.int64

    def refuse(*args, **kwargs):
        raise AssertionError("a task matched the stores' image ids again")

    monkeypatch.setattr("stages.cka.align_samples", refuse)
    task = plan.tasks[0]
    rx, ry = task.rows[0], task.cols[0]
    value = cka_tile(task)["values"][0][0]
    x = stored(wf, rx.stage, rx.array_path, rx.t_index)[plan.align.positions[str(rx.path)]]
    y = stored(wf, ry.stage, ry.array_path, ry.t_index)[plan.align.positions[str(ry.path)]]
    assert value == pytest.approx(linear_cka(x, y), abs=1e-10)


def test_auto_streams_pooled_features_and_keeps_grams_for_wide_ones():
    """``route: auto`` weighs flops: 4 pooled representations (p = 256) of 10,000 samples stream
    their 6 pairs (co-moments); 4 raw maps of 40 samples x 1,024 features take the Grams."""
    from stages.cka import _stream_is_cheaper

    def reps(p):
        return [types.SimpleNamespace(label=f"r{k}", n_features=p) for k in range(4)]

    pooled, raw = reps(256), reps(1024)
    assert _stream_is_cheaper(pooled, pooled, 10_000)
    assert not _stream_is_cheaper(raw, raw, 40)
