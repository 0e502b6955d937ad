"""Damaged stores: found and named (verify, every reader), repaired, recomputed; finalize after kills.

One tiny extract store is built once with the real runner; each test damages a copy
of its workflow folder (flip a byte inside a shard, truncate it, delete it, delete a
``zarr.json``, corrupt or delete a ``done`` chunk) and checks the exact one-line
messages, the exit codes, and that repair + re-run gives arrays identical to the
undamaged store while the other units' shard files keep their mtimes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from helpers import write_extract_workflow

from pipeline import store
from pipeline.cli.commands import main
from pipeline.errors import StoreError

ROOT = Path(__file__).resolve().parents[1]
SHARD = "blocks/mid_block/activations/c/1/0/0/0/0"  # unit 1 = samples 8..15


def run_workflow(wf: Path, **kwargs):
    from pipeline.workflow.config import load_workflow
    from pipeline.workflow.runner import Runner
    from stages import STAGES

    only = kwargs.pop("only", None)
    return Runner(load_workflow(wf, STAGES), progress=False, echo=lambda m: None, **kwargs).run(only=only)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A complete extract workflow folder: 20 samples, 2 blocks, 2 timesteps, units of 8 (3 units)."""
    folder = tmp_path_factory.mktemp("built")
    wf = write_extract_workflow(folder, blocks="[down_blocks.1, mid_block]", timesteps="[10, 100]",
                                dataset="{reader: digits, split: test, limit: 20}")
    run_workflow(wf)
    return folder


@pytest.fixture
def copy(built, tmp_path):
    """A fresh copy of the built workflow folder: (workflow path, store path)."""
    folder = tmp_path / "copy"
    shutil.copytree(built, folder)
    return folder / "wf.yaml", folder / "out" / "ex.zarr"


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def shard_mtimes(path: Path) -> dict[str, int]:
    return {str(f.relative_to(path)): f.stat().st_mtime_ns for f in (path / "blocks").rglob("c/*/0/0/0/0")}


def source_of(path: Path):
    from pipeline.store.source import ZarrSource

    return ZarrSource([(str(path), "blocks/mid_block/activations")], [10, 100])


# ----------------------------------------------------------------- verify: found and named


def test_an_intact_store_verifies(built):
    result = cli("verify", built / "out" / "ex.zarr")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"ok: {built / 'out' / 'ex.zarr'} (extract), ")


def test_a_flipped_byte_is_named_by_verify_and_by_every_reader(copy):
    _, path = copy
    shard = path / SHARD
    flip_byte(shard, 40)  # inside the first inner chunk: timestep 10 of samples 8..15
    result = cli("verify", path)
    assert result.exit_code == 1
    line = ("damaged     block 'mid_block' chunk (1, 0, 0, 0, 0) (samples 8..15, timestep 10) in "
            f"{SHARD} fails its crc32c checksum")
    assert result.output.splitlines()[0] == line
    expected = (f"store {path}: block 'mid_block' chunk (1, 0, 0, 0, 0) (samples 8..15, timestep 10) in "
                f"{SHARD} fails its crc32c checksum: its bytes on disk are damaged; 'diffprobe verify {path}' "
                "lists the damage; with --repair it marks the units to recompute on the next run")
    with source_of(path) as src, pytest.raises(StoreError) as exc:
        list(src.iter_batches(np.arange(20), 8, keys=["t10"], shuffle=False, seed=0, epoch=0))
    assert str(exc.value) == expected
    from pipeline.cka import select as cka_select

    rep = SimpleNamespace(path=str(path), array_path="blocks/mid_block/activations")
    with pytest.raises(StoreError) as exc:
        cka_select.gather_rows(cka_select.open_array(rep), 0, np.arange(20))
    assert str(exc.value) == expected


def test_a_truncated_shard_is_named(copy):
    _, path = copy
    shard = path / SHARD
    os.truncate(shard, shard.stat().st_size // 2)
    result = cli("verify", path)
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith(
        f"damaged     block 'mid_block' chunk (1, 0, 0, 0, 0) (samples 8..15, timestep 10) in {SHARD} ")


def test_a_deleted_shard_is_never_read_as_nan(copy):
    _, path = copy
    (path / SHARD).unlink()
    result = cli("verify", path)
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == (
        f"missing     block 'mid_block' samples 8..15, all timesteps: {SHARD} is missing, though done marks "
        "the unit written")
    with pytest.raises(StoreError) as exc:
        source_of(path)
    assert str(exc.value) == (
        f"store {path}: block 'mid_block' has no data for samples 8..15, all timesteps, which done marks "
        f"written: {SHARD} is missing; 'diffprobe verify {path}' lists the damage; with --repair it marks "
        "the units to recompute on the next run")


def test_a_deleted_array_metadata_is_found_and_rewritten(copy):
    _, path = copy
    meta = path / "blocks/mid_block/activations/zarr.json"
    original = json.loads(meta.read_text())
    meta.unlink()
    result = cli("verify", path)
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == (
        "metadata    blocks/mid_block/activations/zarr.json is missing (the consolidated metadata still has "
        "it: --repair rewrites it)")
    result = cli("verify", path, "--repair")
    assert result.exit_code == 0, result.output
    assert json.loads(meta.read_text()) == original
    assert cli("verify", path).exit_code == 0


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_done_chunk_is_one_line_and_rebuilt_from_the_data(copy, built, damage):
    wf, path = copy
    chunk = path / "done" / "c" / "1"
    if damage == "flip":
        flip_byte(chunk, chunk.stat().st_size - 6)
    else:
        chunk.unlink()
    result = cli("inspect", path)
    if damage == "flip":
        assert result.exit_code == 2
        assert result.output == (
            f"error: store {path}: the done mask is damaged: its chunk 1 (samples 8..15) fails its crc32c "
            f"checksum; 'diffprobe verify {path} --repair' rebuilds it from the data present\n")
        from pipeline.cka.select import align_samples

        with pytest.raises(StoreError) as exc:
            align_samples([path])
        assert str(exc.value) == result.output[len("error: "):-1]
    result = cli("verify", path)
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith("done        ")
    before = shard_mtimes(path)
    result = cli("verify", path, "--repair")
    assert result.exit_code == 0, result.output
    assert "repair      samples 8..15: done rebuilt from the data present (written)" in result.output
    assert store.unit_status(path).all() and store.read_attrs(path)["complete"]
    assert run_workflow(wf) == [("ex", "skip (up to date)")]  # nothing to recompute
    assert shard_mtimes(path) == before
    assert cli("diff", built / "out" / "ex.zarr", path).exit_code == 0


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_repair_then_run_recomputes_only_the_damaged_unit(copy, built, damage):
    wf, path = copy
    if damage == "flip":
        flip_byte(path / SHARD, 40)
    else:
        (path / SHARD).unlink()
    before = shard_mtimes(path)
    result = cli("verify", path, "--repair")
    assert result.exit_code == 0, result.output
    assert "repair      samples 8..15: marked pending (blocks/mid_block/activations damaged or missing)" \
        in result.output
    assert list(store.unit_status(path)) == [True, False, True]
    assert run_workflow(wf) == [("ex", "resume")]
    after = shard_mtimes(path)
    untouched = {k: v for k, v in before.items() if "/c/1/" not in k}
    assert {k: after[k] for k in untouched} == untouched  # units 0 and 2 were not rewritten
    assert cli("verify", path).exit_code == 0
    result = cli("diff", built / "out" / "ex.zarr", path)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "identical within atol=0, rtol=0"


def test_diff_names_the_block_and_timestep_that_differ(copy, built):
    _, path = copy
    array = zarr.open_group(str(path), mode="r+")["blocks/down_blocks.1/activations"]
    unit = array[0:8]
    unit[3, 1, 0, 0, 0] += 0.5
    array[0:8] = unit
    result = cli("diff", built / "out" / "ex.zarr", path)
    assert result.exit_code == 1
    rows = {tuple(line.split()[:4]): line.split() for line in result.output.splitlines()[1:-1]}
    assert rows[("block", "'down_blocks.1'", "100", "0.5")][-2] == "1"
    assert rows[("block", "'down_blocks.1'", "10", "0")][-2] == "0"
    assert cli("diff", built / "out" / "ex.zarr", path, "--atol", "0.6").exit_code == 0


# ----------------------------------------------------------------- classify errors: lost is not eliminated


def classify_store(path: Path) -> np.ndarray:
    """A classify error store written by the write protocol: 16 samples, 3 classes, 4 trials."""
    from pipeline.store import error_tensor as errorstore

    layout = errorstore.make_error_layout(16, 3, 4, unit_samples=8)
    labels = np.arange(16) % 3
    errorstore.create_error_store(path, layout, [f"img{i}" for i in range(16)], labels.tolist(),
                                  ["a", "b", "c"], [0, 1, 2], ["", "", ""], [100, 300, 500, 700], [0, 0, 0, 0],
                                  {"stage": "classify", "stage_hash": "x", "plan": {}, "schedule": {"loss": "l2"}})
    rng = np.random.default_rng(0)
    errors = rng.random((16, 3, 4)).astype(np.float32) + 1
    errors[np.arange(16), labels] -= 0.9  # the true class has the smallest error
    errors[np.arange(16), (labels + 1) % 3, 2:] = np.nan  # a wrong class eliminated after two trials
    root = store.open_root(path, mode="r+")
    for unit in range(2):
        s = slice(8 * unit, 8 * unit + 8)
        result = errorstore.UnitResult({loss: errors[s] for loss in errorstore.LOSSES}, labels[s],
                                       np.full(8, 10), {})
        errorstore.write_error_unit(root, layout, unit, result)
    assert store.finalize(path)
    return errors


def test_a_lost_classify_shard_is_refused_not_scored_as_eliminated(tmp_path):
    from pipeline.dc.rescore import score_store

    path = tmp_path / "clf.zarr"
    classify_store(path)
    assert score_store(path)["accuracy"] == 1.0
    (path / "error_l2" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(StoreError) as exc:
        score_store(path)
    assert str(exc.value).startswith(
        f"store {path}: array 'error_l2' has no data for samples 8..15, all timesteps, which done marks written: "
        "error_l2/c/1/0/0 is missing")
    result = cli("score", path)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    result = cli("verify", path)
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == ("missing     array 'error_l2' samples 8..15, all timesteps: "
                                             "error_l2/c/1/0/0 is missing, though done marks the unit written")
    assert cli("verify", path, "--repair").exit_code == 0
    assert list(store.unit_status(path)) == [True, False]


def test_a_flipped_classify_byte_names_array_chunk_and_samples(tmp_path):
    from pipeline.dc.rescore import score_store

    path = tmp_path / "clf.zarr"
    classify_store(path)
    flip_byte(path / "error_l2" / "c" / "0" / "0" / "0", 20)
    with pytest.raises(StoreError, match=r"array 'error_l2' chunk \(0, 0, 0\) \(samples 0\.\.7, all timesteps\) "
                                         r"in error_l2/c/0/0/0 fails its crc32c checksum"):
        score_store(path)


# ----------------------------------------------------------------- durability


def test_a_unit_is_fsynced_before_its_done_cells(tmp_path, monkeypatch):
    path = tmp_path / "clf.zarr"
    synced: list[str] = []
    real = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    classify_store(path)
    shard = str(path / "error_l2" / "c" / "1" / "0" / "0")
    done = str(path / "done" / "c" / "1")
    assert shard in synced and done in synced
    assert synced.index(shard) < synced.index(done)
    assert str(path / "error_l2" / "c" / "1") in synced  # the folder holding the new name too


# ----------------------------------------------------------------- finalize after kills


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def unfinalized(copy) -> Path:
    """The copy's store with every unit done but not finalized (as a killed finisher leaves it)."""
    _, path = copy
    store.stamp_attrs(path, {"complete": False})
    return path


def test_a_lock_left_by_a_dead_process_is_taken_over(copy):
    import socket

    from pipeline.store.locks import lock_path

    path = unfinalized(copy)
    lock = lock_path(path)
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "start": None, "time": 0}))
    assert store.finalize(path)
    assert store.read_attrs(path)["complete"] and not lock.exists()


def test_a_live_holder_is_waited_for_then_named(copy, monkeypatch):
    from pipeline.store import locks

    path = unfinalized(copy)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = {"pid": holder.pid, "host": locks.socket.gethostname(), "start": locks.process_start(holder.pid),
                 "time": 0}
        locks.lock_path(path).write_text(json.dumps(owner))
        locked = rf"finalize has been locked by pid {holder.pid} on host .* for over 0 s; if that process is gone"
        with pytest.raises(StoreError, match=locked), locks.finalize_lock(path, finished=lambda: False, wait_s=0.3):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert store.finalize(path)  # the holder is gone now: taken over


def test_a_lock_of_another_host_is_taken_over_once_it_stops_changing(copy, monkeypatch):
    from pipeline.store import locks

    path = unfinalized(copy)
    monkeypatch.setattr(locks, "STALE_AFTER_S", 0.5)
    locks.lock_path(path).write_text(json.dumps({"pid": 1, "host": "elsewhere", "start": None, "time": 0}))
    assert store.finalize(path)
    assert store.read_attrs(path)["complete"]


FINALIZE = "import sys; from pipeline import store; store.finalize(sys.argv[1])"


@pytest.mark.parametrize("point", ["finalize:consolidate", "finalize:stamp"])
def test_kill_9_during_finalize_then_finalize_completes(copy, built, point):
    from pipeline.store.locks import lock_path

    path = unfinalized(copy)
    env = os.environ | {"DIFFPROBE_FAULT_KILL_AT": point, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", FINALIZE, str(path)], env=env, cwd=ROOT, check=False)
    assert proc.returncode == -9
    assert lock_path(path).exists() and not store.read_attrs(path)["complete"]
    assert cli("verify", path).output.splitlines()[0].startswith("leftover    ")
    assert store.finalize(path)
    assert store.read_attrs(path)["complete"] and not lock_path(path).exists()
    assert cli("diff", built / "out" / "ex.zarr", path).exit_code == 0
    assert cli("verify", path).exit_code == 0


def test_kill_9_of_a_run_in_finalize_then_run_and_force_complete(tmp_path, built):
    """The issue's case: a run killed while consolidating, then a plain run, then a --force rebuild."""
    from pipeline.store.locks import lock_path

    wf = write_extract_workflow(tmp_path / "k", blocks="[down_blocks.1, mid_block]", timesteps="[10, 100]",
                                dataset="{reader: digits, split: test, limit: 20}")
    path = wf.parent / "out" / "ex.zarr"
    env = os.environ | {"DIFFPROBE_FAULT_KILL_AT": "finalize:consolidate", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli.commands", "run", str(wf), "--no-progress"],
                          env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == -9, proc.stderr
    assert lock_path(path).exists()
    assert run_workflow(wf) == [("ex", "resume")]
    assert store.read_attrs(path)["complete"] and not lock_path(path).exists()
    assert cli("diff", built / "out" / "ex.zarr", path).exit_code == 0
    lock_path(path).write_text(json.dumps({"pid": dead_pid(), "host": os.uname().nodename, "start": None,
                                           "time": 0}))
    # --force replaces an up-to-date stage only when it is named (--only)
    assert run_workflow(wf, force=True, only="ex") == [("ex", "replace (--force)")]
    assert store.read_attrs(path)["complete"]


def test_a_kill_during_schema_creation_leaves_a_temp_folder_the_next_build_removes(tmp_path):
    path = tmp_path / "clf.zarr"
    code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; "
            "from test_store_integrity import classify_store; classify_store(Path(sys.argv[1]))")
    env = os.environ | {"DIFFPROBE_FAULT_KILL_AT": "schema:build", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, cwd=ROOT, check=False)
    assert proc.returncode == -9
    left = list(tmp_path.glob(".clf.zarr.tmp-*"))
    assert len(left) == 1 and not path.exists()
    classify_store(path)
    assert not list(tmp_path.glob(".clf.zarr.tmp-*"))
    assert cli("verify", path).exit_code == 0


# ----------------------------------------------------------------- results folders (probe, cka)


def results_folder(path: Path) -> None:
    import xarray as xr

    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    group.attrs["diffprobe"] = {"stage": "probe", "stage_hash": "h", "format_version": 1, "complete": False}
    acc = np.array([[0.5, 0.75], [np.nan, np.nan]])  # a failed block: an all-NaN row
    ds = xr.Dataset({"accuracy": (("block", "timestep"), acc)},
                    coords={"block": np.array(["a", "b"], dtype=object), "timestep": [10, 100]})
    ds.attrs["diffprobe"] = {"stage": "probe", "stage_hash": "h", "format_version": 1}
    store.write_results_dataset(ds, path, complete=True)


def test_a_results_folder_verifies_and_a_flipped_byte_is_named(tmp_path):
    path = tmp_path / "p.probe"
    results_folder(path)
    other = tmp_path / "q.probe"
    results_folder(other)
    assert cli("verify", path).exit_code == 0
    assert cli("diff", path, other).exit_code == 0
    flip_byte(path / "accuracy" / "c" / "0" / "0", 12)
    result = cli("verify", path)
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == ("damaged     array 'accuracy' chunk (0, 0) (all timesteps) in "
                                             "accuracy/c/0/0 fails its crc32c checksum")
    result = cli("verify", path, "--repair")
    assert result.exit_code == 0, result.output
    assert not (path / "accuracy" / "c" / "0" / "0").exists()
    assert store.read_attrs(path)["complete"] is False  # the next run rewrites it from its task cache
    assert "repair      cleared 'complete'" in result.output


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_pool_refuses_a_source_unit_that_is_lost_or_damaged(copy, tmp_path, damage):
    from pipeline.store.slices import pooled_key
    from stages.pool import PoolTask, pool_unit

    _, path = copy
    src = store.load_layout(path)
    layout = store.make_layout(src.n_samples, {pooled_key("mid_block", 1): (src.blocks["mid_block"][0], 1, 1)},
                               src.timesteps, unit_samples=src.unit_samples)
    root = store.open_root(path)
    samples = store.SampleTable([str(i) for i in root["image_id"][:]], root["view"][:].tolist(),
                                root["flipped"][:].tolist(), root["label"][:].tolist())
    out = tmp_path / "pooled.zarr"
    store.create_store(out, layout, samples, [str(c) for c in root["class_name"][:]], {"stage": "pool"})
    task = PoolTask("unit-1", str(path), str(out), 1, ("mid_block",), src.timesteps, (1,), "avg")
    if damage == "delete":
        (path / SHARD).unlink()
        expected = (f"store {path}: block 'mid_block' has no data for samples 8..15, all timesteps, which done "
                    f"marks written: {SHARD} is missing")
    else:
        flip_byte(path / SHARD, 40)
        expected = (f"store {path}: block 'mid_block' chunk (1, 0, 0, 0, 0) (samples 8..15, timestep 10) in "
                    f"{SHARD} fails its crc32c checksum")
    with pytest.raises(StoreError) as exc:
        pool_unit(task)
    assert str(exc.value).startswith(expected)
    assert not store.unit_status(out)[1]  # nothing was written for the unit


def test_an_empty_lock_of_an_older_diffprobe_is_taken_over_once_old(copy):
    from pipeline.store.locks import lock_path

    path = unfinalized(copy)
    lock = lock_path(path)
    lock.touch()
    os.utime(lock, (lock.stat().st_atime - 120, lock.stat().st_mtime - 120))
    assert store.finalize(path)
    assert store.read_attrs(path)["complete"] and not lock.exists()


def test_coordinates_are_checked_against_the_dataset_identity(copy):
    import hashlib

    from pipeline.datasets import DatasetConfig, open_dataset

    _, path = copy
    records = open_dataset(DatasetConfig(reader="digits", split="test", limit=20)).records
    digest = hashlib.sha256(b"".join(f"{r.image_id}\x1f{int(r.label)}\x1e".encode() for r in records))
    store.stamp_attrs(path, {"identity": {"n_images": len(records), "ids_sha256": digest.hexdigest()}})
    assert cli("verify", path).exit_code == 0
    labels = zarr.open_group(str(path), mode="r+")["label"]
    changed = labels[:]
    changed[3] = (changed[3] + 1) % 10
    labels[:] = changed
    result = cli("verify", path)
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith("coordinates image_id/label (20 images, sha256 ")
