"""A researcher's first hour: errors before compute time (``--dry-run``, ``plan``), refusals
of silent surprises, and messages a researcher reads without Python jargon."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli.commands import main
from test_errors_cli import invoke, one_error_line

BAD_INPUTS = [
    ({"blocks": "[down_blocks.9]"}, "unknown block 'down_blocks.9'"),
    ({"timesteps": "[10, 1000]"}, "timestep 1000 outside the scheduler's range"),
    ({"device": "cuda"}, "CUDA is not available here"),
    ({"model": "{config: tiny_unet.json, null_class: 99}"}, "null_class 99"),
    ({"conditioning": "none"}, "the model is class-conditional"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_INPUTS)
def test_dry_run_refuses_what_run_refuses(extract_workflow, overrides, expected):
    import torch

    if overrides.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    wf = extract_workflow(**overrides)
    dry = one_error_line(*invoke("run", wf, "--dry-run"))
    assert expected in dry, dry
    assert not (wf.parent / "out").exists()
    real = one_error_line(*invoke("run", wf, "--no-progress"))
    assert real == dry


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
    assert "pooled" in out and "not estimated" in out
