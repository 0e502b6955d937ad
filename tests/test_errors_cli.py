"""Bad input gives one clear line and a non-zero exit; the CLI's other commands work."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli.commands import main

from helpers import invoke, one_error_line


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"blocks": "[down_blocks.9]"}, "unknown block 'down_blocks.9' (did you mean 'down_blocks.1'?); valid: conv_in"),
        ({"timesteps": "[10, 1000]"}, "timestep 1000 outside the scheduler's range; use integers 0..999"),
        ({"timesteps": "[-1]"}, "timestep -1 outside"),
        ({"dataset": "{reader: imagefolder, root: /nonexistent/folder}"}, "dataset root '/nonexistent/folder'"),
        ({"timestep": "[10]"}, "wf.yaml:13: 'stages.ex.timestep': unknown key (did you mean 'timesteps'?)"),
        ({"batch_size": "'eight'"}, "wf.yaml:11: 'stages.ex.batch_size' must be an integer, got 'eight'"),
        ({"device": "cuda"}, "CUDA is not available here; use device: cpu"),
        ({"dtype": "float8"}, "'stages.ex.dtype' is 'float8'"),
        ({"conditioning": "none"}, "the model is class-conditional: set conditioning: class"),
        ({"model": "{config: missing.json}"}, "missing.json' does not exist"),
        ({"model": "{config: tiny_unet.json, null_class: 99}"}, "null_class 99"),
    ],
)
def test_bad_input_one_line_and_dry_run_refuses_it_first(extract_workflow, overrides, expected):
    import torch

    if overrides.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    wf = extract_workflow(**overrides)
    dry = one_error_line(*invoke("run", wf, "--dry-run"))
    assert not (wf.parent / "out").exists()
    line = one_error_line(*invoke("run", wf, "--no-progress"))
    assert expected in line, line
    assert line == dry  # errors before compute time: --dry-run says what run would
    assert not (wf.parent / "out" / "ex.zarr").exists()  # nothing partial left behind


def test_missing_workflow_and_verbose_traceback(tmp_path):
    line = one_error_line(*invoke("run", tmp_path / "nope.yaml"))
    assert "not found" in line
    result = CliRunner().invoke(main, ["-v", "run", str(tmp_path / "nope.yaml")])
    assert result.exception is not None  # -v lets the traceback through


def test_input_must_name_an_earlier_stage(tmp_path, extract_workflow):
    wf = extract_workflow()
    wf.write_text(wf.read_text() + "  - name: again\n    stage: extract\n    model: {config: tiny_unet.json}\n"
                  "    dataset: {reader: digits}\n  - name: ex\n    stage: extract\n"
                  "    model: {config: tiny_unet.json}\n    dataset: {reader: digits}\n")
    line = one_error_line(*invoke("run", wf))
    assert "duplicate stage name 'ex'" in line


def test_inspect_blocks_plan_dry_run(extract_workflow, tiny_unet_json):
    wf = extract_workflow()
    code, out = invoke("run", wf, "--dry-run")
    assert code == 0 and "ex (extract)" in out and ": run" in out
    code, out = invoke("plan", wf)
    assert code == 0, out
    for word in ("samples", "forward passes", "bytes on disk", "free space", "time (est.)"):
        assert word in out
    assert "30 (views=1)" in out and "forward passes        23 (batch 4; 90 sample-timesteps)" in out
    code, out = invoke("run", wf, "--no-progress")
    assert code == 0, out
    code, out = invoke("inspect", wf.parent / "out" / "ex.zarr")
    assert code == 0 and "complete  yes" in out and "mid_block" in out and "ratio" in out
    code, out = invoke("blocks", tiny_unet_json)
    assert code == 0 and "down_blocks.1.attentions.0" in out and "(16, 8, 8)" in out
    line = one_error_line(*invoke("inspect", wf.parent / "nothing.zarr"))
    assert "does not exist" in line


def test_top_level_help_lists_every_command_without_truncation():
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["--help"], terminal_width=80)
    assert result.exit_code == 0
    listed = [line for line in result.output.splitlines() if line.startswith("  ") and not line.lstrip().startswith("-")]
    assert {line.split()[0] for line in listed} >= {"run", "plan", "blocks", "inspect", "results", "score",
                                                     "verify", "diff"}
    assert not any(line.rstrip().endswith("...") for line in listed), result.output
