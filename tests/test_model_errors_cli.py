"""Model inputs a user gets wrong: one line naming the fix, exit 2, no traceback or library noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TINY_UNET, invoke, one_error_line


ROOT = Path(__file__).resolve().parent.parent
TINY_ADM = ROOT / "data/factories/guided_diffusion_tiny.py"




@pytest.mark.parametrize(("config", "expected"), [
    ({"_class_name": "AutoencoderKL", "block_out_channels": [8]}, "is a config for AutoencoderKL, not UNet2DModel"),
    ({"foo": 1}, "has none of UNet2DModel's arguments (keys: foo)"),
    ([1, 2], "is not a model config (a JSON object)"),
    (TINY_UNET | {"block_out_channels": [8]}, "is not a valid UNet2DModel config: Must provide the same number"),
])
def test_config_json_that_is_not_a_unet(extract_workflow, tmp_path, config, expected):
    bad = tmp_path / "wf" / "bad.json"
    wf = extract_workflow(model="{config: bad.json}")
    bad.write_text(json.dumps(config))
    for command in (["run", wf, "--no-progress"], ["plan", wf], ["blocks", bad]):
        line = one_error_line(*invoke(*command))
        assert expected in line and "bad.json" in line, (command, line)


def test_blocks_size_that_breaks_the_skips(tiny_unet_json):
    line = one_error_line(*invoke("blocks", tiny_unet_json, "--size", 15))
    assert "input size 15 is not a multiple of 2" in line and "use size 14 or 16" in line
    code, out = invoke("blocks", tiny_unet_json, "--size", 24)
    assert code == 0 and "(16, 12, 12)" in out


def test_blocks_size_a_factory_model_cannot_take():
    line = one_error_line(*invoke("blocks", f"{TINY_ADM}:tiny_adm", "--size", 20, "--option", "in_channels=3"))
    assert "guided_diffusion_tiny.py:tiny_adm' failed in float32 on input (1, 3, 20, 20)" in line
    assert "check the input size" in line


def test_paper_block_numbers_on_a_diffusers_model(extract_workflow):
    line = one_error_line(*invoke("run", extract_workflow(blocks="[24]"), "--no-progress"))
    assert "numbers are the paper's block numbering" in line and "guided-diffusion layouts" in line
    assert "this unet2d model has none" in line and "mid_block" in line


def test_model_folder_without_weights_names_safetensors(tmp_path, capfd):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_UNET | {"_class_name": "UNet2DModel"}))
    line = one_error_line(*invoke("blocks", folder))
    assert "diffusion_pytorch_model.safetensors" in line and "random_init: true" in line
    captured = capfd.readouterr()
    assert "accelerate" not in captured.err + captured.out and "Defaulting" not in captured.err + captured.out


def test_null_class_out_of_range_says_range_and_fix(extract_workflow):
    line = one_error_line(*invoke("run", extract_workflow(model="{config: tiny_unet.json, null_class: 99}"),
                                  "--no-progress"))
    assert "null_class 99 is outside the model's 11 class embeddings (valid: 0-10)" in line
    assert "set model.null_class" in line


def test_factory_null_class_out_of_range():
    from pipeline.errors import ModelError
    from pipeline.models import ModelConfig, load_model

    options = {"image_size": 32, "in_channels": 3, "num_classes": 5}
    with pytest.raises(ModelError, match=r"null_class 99 is outside factory .*'s 5 class labels \(valid: 0-4\)"):
        load_model(ModelConfig(kind="factory", factory=f"{TINY_ADM}:tiny_adm", options=options, null_class=99))


def test_factory_option_it_does_not_take_is_an_error():
    line = one_error_line(*invoke("blocks", f"{TINY_ADM}:tiny_adm", "--option", "use_fp16=true",
                                  "--option", "model_chanels=4"))
    assert "takes no option 'use_fp16'; accepted: image_size, in_channels, num_classes, model_channels" in line
    assert "timestep_free, value_range (the adapter's)" in line
    line = one_error_line(*invoke("blocks", f"{TINY_ADM}:tiny_adm", "--option", "model_chanels=4"))
    assert "takes no option 'model_chanels' (did you mean 'model_channels'?)" in line
    adm = ROOT / "data/factories/guided_diffusion_adm.py"
    line = one_error_line(*invoke("blocks", f"{adm}:adm256_uncond", "--option", "checkpoint=x.pt"))
    assert "needs option(s) repo: set them under model.options" in line


def test_factory_with_kwargs_gets_every_option(tmp_path):
    from pipeline.models import ModelConfig, load_model

    factory = tmp_path / "anything.py"
    factory.write_text("import torch\nseen = {}\n"
                       "def build(**options):\n    seen.update(options)\n"
                       "    return torch.nn.Conv2d(1, 1, 1)\n")
    adapter = load_model(ModelConfig(kind="factory", factory=f"{factory}:build",
                                     options={"image_size": 8, "in_channels": 1, "timestep_free": True,
                                              "colour": "blue"}))
    import sys

    seen = next(m for m in sys.modules.values() if getattr(m, "__file__", None) == str(factory)).seen
    assert seen == {"image_size": 8, "in_channels": 1, "colour": "blue"}  # adapter-only options withheld
    assert adapter.blocks() == []


def test_half_precision_failure_in_model_code_is_one_line(tmp_path):
    factory = tmp_path / "fp32only.py"
    factory.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    image_size, in_channels = 16, 1\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv, self.head = torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Conv2d(1, 1, 1)\n"
        "    def forward(self, x, t):\n"
        "        h = self.conv(x)\n"
        "        # a float32 accumulator: fails once the conv runs in half (shapes alone are fine)\n"
        "        h = torch.zeros(h.shape, device=h.device).index_add_(0, torch.arange(len(h), device=h.device), h)\n"
        "        return self.head(h)\n"
        "def net():\n    return Net()\n")
    wf_dir = tmp_path / "wf"
    wf_dir.mkdir()
    wf = wf_dir / "wf.yaml"
    wf.write_text(f"""name: t
output_dir: out
stages:
  - name: ex
    stage: extract
    model: {{kind: factory, factory: "{factory}:net"}}
    dataset: {{reader: digits, split: test, limit: 4}}
    blocks: [head]
    timesteps: [10]
    compute_dtype: bfloat16
""")
    code, out = invoke("blocks", f"{factory}:net")  # shapes come from the meta device: no failure yet
    assert code == 0 and "head" in out, out
    line = one_error_line(*invoke("run", wf, "--no-progress"))  # the failure comes during extraction
    assert "fp32only.py:net' failed in bfloat16" in line and "set compute_dtype: float32" in line
