"""What a fresh ``diffprobe run`` pays before its first stage: imports and the collector.

Each test runs a child process, the only place a fresh interpreter's imports can be
seen: ``pipeline.models.imports`` (diffusers' model classes without their packages'
eager siblings) and ``pipeline.cli.collector`` (the collector paused until the stages
are validated, the heap frozen at exit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import write_extract_workflow

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "data" / "models" / "digits-ddpm"


def child(code: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last, which is returned."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_unet2d_loads_without_the_other_diffusers_models_or_hf_transformers_and_is_the_same_model(tmp_path):
    got = child(f"""
        import json, sys
        import torch
        from pipeline.models import ModelConfig, load_model

        adapter = load_model(ModelConfig(path={str(DIGITS)!r}, null_class=10))
        loaded = sorted(m for m in ("scipy", "scipy.stats", "diffusers.models.unets.unet_1d",
                                    "diffusers.models.transformers.ace_step_transformer",
                                    "transformers", "transformers.loss.loss_utils", "diffusers.quantizers",
                                    "diffusers.quantizers.pipe_quant_config") if m in sys.modules)
        quantizer = sys.modules["diffusers.models.modeling_utils"].DiffusersAutoQuantizer

        # the packages' own __init__ still work afterwards, and hand out the same classes
        from diffusers import UNet2DConditionModel, UNet2DModel
        from diffusers.models import unets
        from diffusers.quantizers import DiffusersAutoQuantizer, PipelineQuantizationConfig
        plain = UNet2DModel.from_pretrained({str(DIGITS / "unet")!r}).eval()
        x, t = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 50, 500])
        labels = torch.tensor([1, 2, 10])
        with torch.no_grad():
            same = bool(torch.equal(adapter.module(x, t, class_labels=labels).sample,
                                    plain(x, t, class_labels=labels).sample))
        print(json.dumps({{"loaded": loaded,
                          "same_class": type(adapter.module) is UNet2DModel is unets.UNet2DModel,
                          "condition_unet": unets.UNet2DConditionModel is UNet2DConditionModel, "same": same,
                          "quantizer": quantizer is DiffusersAutoQuantizer,
                          "pipeline_config": PipelineQuantizationConfig.__module__}}))
    """, tmp_path)
    assert got == {"loaded": [], "same_class": True, "condition_unet": True, "same": True, "quantizer": True,
                   "pipeline_config": "diffusers.quantizers.pipe_quant_config"}


def test_the_program_resumes_the_collector_before_the_stages_and_freezes_the_startup_heap(tmp_path):
    wf = write_extract_workflow(tmp_path, dataset="{reader: digits, split: test, limit: 8}", timesteps="[10]",
                                blocks="[mid_block]")
    got = child(f"""
        import atexit, gc, json, sys
        import pipeline.workflow.runner as runner

        seen = {{}}
        validate = runner.Runner.validate

        def spy(self, selected):
            seen["during_validate"] = gc.isenabled()
            return validate(self, selected)

        runner.Runner.validate = spy
        original = runner.Runner._run_stage

        def stage(self, entry, replace):
            seen["during_stage"] = gc.isenabled()
            seen["frozen"] = gc.get_freeze_count()
            return original(self, entry, replace)

        runner.Runner._run_stage = stage
        # registered before the program's own handler, so it runs after it (atexit is LIFO)
        atexit.register(lambda: print(json.dumps(seen | {{"exit_frozen": gc.get_freeze_count()}})))
        sys.argv = ["diffprobe", "run", {str(wf)!r}, "--no-progress"]
        from pipeline.cli.program import main
        try:
            main()
        except SystemExit as exc:
            seen["code"] = exc.code
    """, tmp_path)
    assert got["code"] in (0, None)
    assert got["during_validate"] is False and got["during_stage"] is True
    assert got["frozen"] > 100_000  # torch, diffusers and the model: the startup heap
    assert got["exit_frozen"] >= got["frozen"]
    assert (tmp_path / "out" / "ex.zarr" / "zarr.json").exists()


def test_in_process_callers_keep_their_collector(tmp_path):
    import gc

    from helpers import invoke

    wf = write_extract_workflow(tmp_path, dataset="{reader: digits, split: test, limit: 8}", timesteps="[10]",
                                blocks="[mid_block]")
    frozen = gc.get_freeze_count()
    code, out = invoke("run", wf, "--no-progress")
    assert code == 0, out
    assert gc.isenabled() and gc.get_freeze_count() == frozen
