"""A researcher's first hour: errors before compute time (``--dry-run``, ``plan``), refusals
of silent surprises, and messages a researcher reads without Python jargon."""

from __future__ import annotations

import pytest

from helpers import invoke, one_error_line

# --dry-run refusing each bad input with run's own line: test_errors_cli.py


def test_bad_later_stage_fails_before_the_first_runs(extract_workflow):
    """A bad second stage is refused before the first stage computes anything."""
    wf = extract_workflow()
    wf.write_text(wf.read_text() + "  - name: ex2\n    stage: extract\n    model: {config: tiny_unet.json, "
                  "null_class: 10}\n    dataset: {reader: digits, split: test, limit: 8}\n"
                  "    conditioning: class\n    timesteps: [1000]\n")
    line = one_error_line(*invoke("run", wf, "--no-progress"))
    assert "timestep 1000" in line
    assert not (wf.parent / "out" / "ex.zarr").exists()


POOL_STAGE = "  - {name: pooled, stage: pool, input: ex, sizes: [1, 64]}\n"


def test_pool_sizes_larger_than_the_map_refused_before_extract(extract_workflow):
    wf = extract_workflow()
    wf.write_text(wf.read_text() + POOL_STAGE)
    dry = one_error_line(*invoke("run", wf, "--dry-run"))
    assert "pool: size 64 is larger than block 'down_blocks.1'" in dry and "use sizes <=" in dry, dry
    assert not (wf.parent / "out").exists()
    real = one_error_line(*invoke("run", wf, "--no-progress"))
    assert real == dry
    assert not (wf.parent / "out" / "ex.zarr").exists()


def test_cka_batch_size_above_the_images_refused_before_extract(extract_workflow):
    """The minibatch estimator's batch_size against the images the inputs will hold:
    refused by --dry-run and by run before extract computes (30 digits here)."""
    wf = extract_workflow()
    wf.write_text(wf.read_text() + "  - {name: mb, stage: cka, estimator: minibatch, batch_size: 64, "
                  "selections: [{input: ex}]}\n")
    dry = one_error_line(*invoke("run", wf, "--dry-run"))
    assert "cka: batch_size 64 exceeds the 30 images of 'ex'" in dry and "batch_size <= 30" in dry, dry
    real = one_error_line(*invoke("run", wf, "--no-progress"))
    assert real == dry
    assert not (wf.parent / "out" / "ex.zarr").exists()


def test_plan_without_the_device_and_extract_pool_warning(extract_workflow):
    """A cuda workflow plans on a CPU machine: rows, bytes, and what it could not measure."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    wf = extract_workflow(device="cuda", pool="{size: 64}")
    wf.write_text(wf.read_text() + POOL_STAGE.replace("[1, 64]", "[1]"))
    code, out = invoke("plan", wf)
    assert code == 0, out
    assert "time (est.)" in out and "not measured: device 'cuda' requested but CUDA is not available here" in out
    assert "bytes on disk (est.)" in out and "bytes raw" in out
    assert "warning: pool.size 64 upsamples down_blocks.1" in out
    assert "pooled" in out and "not estimated" not in out  # pool planned from extract's shapes
    assert "GPU time (proj.)" in out and "on one H100 (projection" in out


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RANK": "0"}, "environment variable RANK is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "4"}, "environment variable WORLD_SIZE is set but RANK is not"),
        ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK/WORLD_SIZE from the environment ('4'/'4'): need 0 <= RANK < WORLD_SIZE"),
        ({"RANK": "a", "WORLD_SIZE": "4"}, "RANK/WORLD_SIZE from the environment ('a'/'4') must be integers"),
    ],
)
def test_rank_world_size_errors_name_the_variables(monkeypatch, env, expected):
    from pipeline.errors import ConfigError
    from pipeline.workflow.runner import parse_shard

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="RANK") as err:
        parse_shard(None)
    assert expected in str(err.value)


def test_rank_world_size_used_when_both_set(monkeypatch):
    from pipeline.workflow.runner import parse_shard

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard(None) == (1, 3)
    assert parse_shard("0/2") == (0, 2)  # the flag wins


def test_results_on_a_missing_path(tmp_path):
    line = one_error_line(*invoke("results", tmp_path / "nope.probe"))
    assert "nope.probe' does not exist" in line


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"blocks": "{a: 1}"}, "'stages.ex.blocks' must be a list of block names, e.g. [down_blocks.2, mid_block], "
                               "or 'all', got {'a': 1}"),
        ({"blocks": "7.5"}, "must be a list of block names"),
    ],
)
def test_type_errors_in_plain_words(extract_workflow, overrides, expected):
    line = one_error_line(*invoke("run", extract_workflow(**overrides), "--dry-run"))
    assert expected in line and "tuple" not in line, line


def test_type_names_in_plain_words():
    from typing import Literal

    from pipeline.workflow.config import _type_name

    assert [_type_name(t) for t in (tuple[int, ...], str, int, float, bool, dict, Literal["a", "b"])] == [
        "a list", "a string", "an integer", "a number", "true or false", "a mapping", "'a' or 'b'"]


def test_one_pixel_images_warn():
    import numpy as np
    from PIL import Image

    from pipeline.datasets.preprocess import Preprocessing, TinyImageWarning, preprocess

    prep = Preprocessing(size=16, channels=3)
    with pytest.warns(TinyImageWarning, match="1x1 pixels; resized to 16x16"):
        out = preprocess(Image.new("RGB", (1, 1), (255, 0, 0)), prep)
    assert out.shape == (3, 16, 16)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preprocess(Image.fromarray(np.zeros((8, 8, 3), np.uint8)), prep)  # digits-sized: no warning


def test_tiny_images_are_one_named_line_each_and_then_a_summary(tmp_path):
    """In a run, each tiny image is one ``warning:`` line naming it (no file/line/source
    noise), and a folder of many broken images does not print a line per image."""
    import subprocess
    import sys

    from PIL import Image

    from pipeline.datasets.preprocess import MAX_TINY_WARNINGS
    from tests.helpers import write_extract_workflow

    for i in range(MAX_TINY_WARNINGS + 3):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (1, 1), (i, 0, 0)).save(tmp_path / "imgs" / f"c{i % 2}" / f"tiny{i}.png")
    wf = write_extract_workflow(tmp_path, dataset="{reader: imagefolder, root: imgs, split: all}",
                                conditioning="null", blocks="[mid_block]", timesteps="[10]")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(wf), "--no-progress"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "pixels" in ln]
    assert len(lines) == MAX_TINY_WARNINGS + 1, proc.stderr
    assert all(ln.startswith("warning: ") for ln in lines), lines
    assert "image c0/tiny0.png is 1x1 pixels" in lines[0] and "not named" in lines[-1]
    assert "TinyImageWarning" not in proc.stderr and "preprocess.py" not in proc.stderr
