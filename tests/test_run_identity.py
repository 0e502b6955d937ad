"""What an output's identity holds, and what the runner does with it: the dataset's
ordered image ids (a changed dataset is refused, never written into shifted rows),
settings that cannot change stored values (out of the hash: a resume with another
batch size continues), --force only where the config changed, never a user's file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import invoke, one_error_line

from pipeline import store
from pipeline.errors import ConfigError, DatasetError, StoreError
from pipeline.workflow.config import Where, build_dataclass, config_dict, load_workflow
from pipeline.workflow.runner import Runner
from stages import STAGES
from stages.extract import ExtractConfig

BLOCKS = ("down_blocks.1", "mid_block", "up_blocks.0")


def runner(path: Path, **kw) -> Runner:
    return Runner(load_workflow(path, STAGES), progress=False, echo=lambda m: None, **kw)


def images(root: Path, names: list[str]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(7)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("bad.png"):
            (root / name).write_bytes(b"\x89PNG\r\n\x1a\n broken")
        else:
            Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(root / name)
    return root


NAMES = ["a/0.png", "a/1.png", "a/2.png", "a/3.png", "b/0.png", "b/bad.png", "b/c.png"]


def folder_workflow(extract_workflow, sub: str, data: Path, **kw) -> Path:
    return extract_workflow(sub, dataset=f"{{reader: imagefolder, root: {data}, split: all}}", unit_samples=2, **kw)


def rows(path: Path) -> tuple[list[str], np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return [str(i) for i in root["image_id"][:]], root["blocks/mid_block/activations"][:]


def test_resume_against_a_changed_dataset_is_refused_naming_the_first_differing_image(extract_workflow, tmp_path):
    data = images(tmp_path / "imgs", NAMES)
    wf = folder_workflow(extract_workflow, "wf", data)
    out = wf.parent / "out/ex.zarr"
    with pytest.raises(DatasetError, match="b/bad.png.*--strict"):
        runner(wf, strict=True).run()
    assert store.unit_status(out).tolist() == [True, True, False, False]
    (data / "b/bad.png").unlink()  # the user removes the corrupt file and runs again
    with pytest.raises(StoreError) as err:
        runner(wf).run()
    message = str(err.value)
    assert "\n" not in message and "--force" in message
    assert "image 5 is 'b/bad.png' in the store but 'b/c.png' in the dataset now (7 images then, 6 now)" in message
    assert store.read_attrs(out)["complete"] is False  # nothing was written
    assert runner(wf, force=True).run() == [("ex", "replace (--force)")]
    ids, acts = rows(out)
    # Every row is its own image: equal to a fresh run on the fixed folder.
    ref = folder_workflow(extract_workflow, "ref", data)
    runner(ref).run()
    ref_ids, ref_acts = rows(ref.parent / "out/ex.zarr")
    assert ids == ref_ids == [n for n in NAMES if "bad" not in n]
    np.testing.assert_array_equal(acts, ref_acts)


def test_no_run_writes_rows_under_another_images_id(extract_workflow, tmp_path):
    """The last guard: even a runner whose hash predates the change (computed before the
    file was deleted) refuses before writing a row."""
    data = images(tmp_path / "imgs", NAMES)
    wf = folder_workflow(extract_workflow, "wf", data)
    out = wf.parent / "out/ex.zarr"
    with pytest.raises(DatasetError):
        runner(wf, strict=True).run()
    stale = runner(wf)
    stale.hashes["ex"]  # hashed now, with b/bad.png still in the folder
    (data / "b/bad.png").unlink()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match="dataset changed since this store was written: image 5 is 'b/bad.png'"):
        stale.run()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_renamed_image_changes_the_hash_of_every_later_stage(extract_workflow, tmp_path):
    data = images(tmp_path / "imgs", NAMES[:4])
    wf = folder_workflow(extract_workflow, "wf", data)
    h1 = runner(wf).hashes["ex"]
    (data / "a/3.png").rename(data / "a/9.png")
    assert runner(wf).hashes["ex"] != h1


def test_a_failed_config_leaves_nothing_that_blocks_the_fixed_one(extract_workflow):
    # conditioning null on a model without null_class: refused before any store exists
    wf = extract_workflow(model="{config: tiny_unet.json}", conditioning="null")
    with pytest.raises(ConfigError, match="null_class"):
        runner(wf).run()
    assert not (wf.parent / "out/ex.zarr").exists()
    wf.write_text(wf.read_text().replace("{config: tiny_unet.json}", "{config: tiny_unet.json, null_class: 10}"))
    assert runner(wf).run() == [("ex", "run")]


def test_an_empty_store_of_another_config_is_replaced_without_force(extract_workflow, tmp_path):
    data = images(tmp_path / "imgs", ["a/bad.png", "a/1.png", "b/0.png"])
    wf = folder_workflow(extract_workflow, "wf", data)
    with pytest.raises(DatasetError):
        runner(wf, strict=True).run()  # fails in unit 0: a store with no unit done
    out = wf.parent / "out/ex.zarr"
    assert out.exists() and not store.unit_status(out).any()
    (data / "a/bad.png").unlink()
    report = runner(wf).run()
    assert report == [("ex", "replace (holds no finished work of another config)")]
    assert store.read_attrs(out)["complete"] is True


def test_settings_that_cannot_change_stored_values_stay_out_of_the_hash():
    def cfg(**kw):
        base = {"model": {"config": "m.json"}, "dataset": {"reader": "digits"}}
        return build_dataclass(ExtractConfig, base | kw, Where(None, None, "ex"))

    hashed = lambda c: config_dict(c, hashed=True)
    assert hashed(cfg(batch_size=4, num_workers=0, device="cuda:0")) == \
        hashed(cfg(batch_size=64, num_workers=8, device="cuda:3", decode_threads=3, torch_threads=5))
    assert hashed(cfg(device="cpu")) != hashed(cfg(device="cuda:0"))
    assert hashed(cfg(seed=1)) != hashed(cfg(seed=2))
    assert config_dict(cfg(batch_size=4))["batch_size"] == 4  # still recorded in attrs


def test_killed_extract_resumes_with_another_batch_size(killed_extract, tmp_path):
    ref, wf = killed_extract(tmp_path)  # a run SIGKILLed after 2 units, and an uninterrupted one
    wf.write_text(wf.read_text().replace("batch_size: 4", "batch_size: 7\n    num_workers: 1"))
    assert runner(wf).run() == [("ex", "resume")]
    for block in BLOCKS:
        a = zarr.open_group(str(ref.parent / "out/ex.zarr"))[f"blocks/{block}/activations"][:]
        b = zarr.open_group(str(wf.parent / "out/ex.zarr"))[f"blocks/{block}/activations"][:]
        np.testing.assert_array_equal(a[:16], b[:16])  # the two units done before the kill
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=1e-4)


def test_force_replaces_only_changed_stages_and_dry_run_names_what_it_deletes(tmp_path, tiny_unet_json):
    wf = tmp_path / "wf.yaml"
    body = """name: t
output_dir: out
stages:
  - {name: a, stage: extract, model: {config: tiny_unet.json, null_class: 10}, conditioning: class,
     dataset: {reader: digits, split: test, limit: 6}, blocks: [mid_block], timesteps: [10]}
  - {name: b, stage: extract, model: {config: tiny_unet.json, null_class: 10}, conditioning: class,
     dataset: {reader: digits, split: test, limit: 6}, blocks: [mid_block], timesteps: [TB]}
"""
    wf.write_text(body.replace("TB", "20"))
    runner(wf).run()
    a_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "out/a.zarr").rglob("*") if p.is_file()}
    wf.write_text(body.replace("TB", "30"))
    lines: list[str] = []
    r = Runner(load_workflow(wf, STAGES), force=True, progress=False, echo=lines.append)
    assert r.run(dry_run=True) == [("a", "skip (up to date)"), ("b", "replace (--force)")]
    assert any(f"would delete {tmp_path / 'out/b.zarr'} (" in line and " files, " in line for line in lines), lines
    assert (tmp_path / "out/b.zarr").exists()  # a dry run deletes nothing
    assert runner(wf, force=True).run() == [("a", "skip (up to date)"), ("b", "replace (--force)")]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out/a.zarr").rglob("*") if p.is_file()} == a_files
    # --only names a stage: --force then replaces it even when up to date
    assert runner(wf, force=True).run(only="a") == [("a", "replace (--force)")]


def test_a_users_file_or_folder_at_an_output_path_is_never_offered_for_deletion(extract_workflow):
    wf = extract_workflow()
    out = wf.parent / "out"
    out.mkdir()
    (out / "ex.zarr").write_text("my notes")
    for force in (False, True):
        with pytest.raises(StoreError, match="is a file, not a diffprobe output.*never deletes") as err:
            runner(wf, force=force).run()
        assert "\n" not in str(err.value)
    assert (out / "ex.zarr").read_text() == "my notes"
    (out / "ex.zarr").unlink()
    (out / "ex.zarr").mkdir()
    (out / "ex.zarr" / "data.csv").write_text("1,2")
    with pytest.raises(StoreError, match="is not a diffprobe output"):
        runner(wf, force=True).run(dry_run=True)
    assert (out / "ex.zarr" / "data.csv").exists()


def test_output_dir_that_is_a_file_is_one_line(extract_workflow):
    wf = extract_workflow()
    (wf.parent / "out").write_text("not a folder")
    line = one_error_line(*invoke("run", wf, "--no-progress"))
    assert line.startswith("error: stage 'ex': ") and "is a file, not a folder; set output_dir" in line, line
