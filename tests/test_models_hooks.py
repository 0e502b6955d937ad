"""Adapters, block listing, paper numbering, hooks and the truncated forward, noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import ModelError
from pipeline.hooks import StopForward, capture, run_truncated
from pipeline.models import ModelConfig, load_model
from pipeline.noise import batch_noise, noise_seed, sample_noise

TINY_ADM = "data/factories/guided_diffusion_tiny.py:tiny_adm"


@pytest.fixture(scope="module")
def adm():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "data/factories/guided_diffusion_tiny.py"
    return load_model(ModelConfig(kind="factory", factory=f"{path}:tiny_adm",
                                  options={"image_size": 32, "in_channels": 3}))


def test_paper_block_numbers_follow_guided_diffusion_layout(adm):
    numbered = {b.paper_number: b for b in adm.blocks() if b.paper_number}
    assert sorted(numbered) == list(range(1, 38))
    assert numbered[1].name == "input_blocks.0" and numbered[18].name == "input_blocks.17"
    assert numbered[19].name == "middle_block" and numbered[24].name == "output_blocks.4"
    assert numbered[37].name == "output_blocks.17"
    # ADM-256's pattern at toy width: block 24 is at the widest level, 2x the smallest map
    assert numbered[24].shape[0] == 4 * 8 and numbered[24].shape[1] == 2 * numbered[19].shape[1]
    chosen = adm.resolve_blocks([24, "19", "input_blocks.3"])
    assert [b.name for b in chosen] == ["input_blocks.3", "middle_block", "output_blocks.4"]  # forward order
    with pytest.raises(ModelError, match="paper block number 38 out of range; valid: 1-37"):
        adm.resolve_blocks([38])


def test_blocks_positions_are_forward_order(tiny_unet_json):
    adapter = load_model(ModelConfig(config=str(tiny_unet_json), null_class=10))
    blocks = adapter.blocks()
    names = [b.name for b in blocks]
    assert names.index("down_blocks.1.resnets.0") < names.index("down_blocks.1") < names.index("mid_block")
    assert names.index("mid_block") < names.index("up_blocks.0") < names.index("conv_out")
    assert [b.position for b in blocks] == list(range(len(blocks)))
    assert dict((b.name, b.shape) for b in blocks)["mid_block"] == (16, 8, 8)
    assert adapter.num_classes == 10 and adapter.null_class == 10


def test_truncated_forward_stops_after_last_block(tiny_unet_json):
    adapter = load_model(ModelConfig(config=str(tiny_unet_json), null_class=10))
    called = []
    handle = adapter.module.up_blocks[0].register_forward_pre_hook(lambda *a: called.append(1))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 500])
    from pipeline.models import Condition

    cond = Condition("class", labels=torch.tensor([1, 2]))
    with capture(adapter.module, ["down_blocks.1", "mid_block"], stop_after="mid_block") as got:
        assert run_truncated(lambda: adapter.forward(x, t, cond)) is None
    handle.remove()
    assert not called, "modules after the last requested block must not run"
    assert got["mid_block"].shape == (2, 16, 8, 8)
    with capture(adapter.module, ["mid_block"]) as full:
        adapter.forward(x, t, cond)
    torch.testing.assert_close(full["mid_block"], got["mid_block"])


def test_hooks_are_removed_even_on_error(tiny_unet_json):
    adapter = load_model(ModelConfig(config=str(tiny_unet_json), null_class=10))
    module = adapter.module
    with pytest.raises(RuntimeError):
        with capture(module, ["mid_block", "down_blocks.0"]):
            module(torch.randn(1, 3, 16, 16), torch.tensor([1]), class_labels=torch.tensor([0]))  # wrong channels
    assert all(not m._forward_hooks for m in module.modules())
    with capture(module, ["mid_block"], stop_after="mid_block"):
        with pytest.raises(StopForward):
            module(torch.randn(1, 1, 16, 16), torch.tensor([1]), class_labels=torch.tensor([0]))
    assert all(not m._forward_hooks for m in module.modules())


def test_noise_is_a_pure_function_of_its_key():
    a = sample_noise(3, "cub/001.jpg", 0, 100, (3, 4, 4))
    b = sample_noise(3, "cub/001.jpg", 0, 100, (3, 4, 4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    others = [sample_noise(4, "cub/001.jpg", 0, 100, (3, 4, 4)), sample_noise(3, "cub/002.jpg", 0, 100, (3, 4, 4)),
              sample_noise(3, "cub/001.jpg", 1, 100, (3, 4, 4)), sample_noise(3, "cub/001.jpg", 0, 101, (3, 4, 4))]
    assert all(not torch.equal(a, o) for o in others)
    batch = batch_noise(3, ["x", "cub/001.jpg"], [0, 0], [7, 100], (3, 4, 4))
    torch.testing.assert_close(batch[1], a, rtol=0, atol=0)  # independent of batch composition
    seeds = {noise_seed(0, f"img{i}", 0, 10) for i in range(1000)}
    assert len(seeds) == 1000
    big = sample_noise(0, "stats", 0, 0, (200_000,)).numpy()
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01


def test_unknown_kind_and_bad_factory():
    with pytest.raises(ModelError, match="unknown model kind 'unet' \\(did you mean 'unet2d'\\?\\)"):
        load_model(ModelConfig(kind="unet"))
    with pytest.raises(ModelError, match="must look like"):
        load_model(ModelConfig(kind="factory", factory="no_colon"))
    with pytest.raises(ModelError, match="cannot import factory module"):
        load_model(ModelConfig(kind="factory", factory="not_a_module_xyz:fn"))


def test_factory_model_extracts_by_paper_number(tmp_path):
    from pathlib import Path

    import zarr

    from pipeline.workflow.config import load_workflow
    from stages import STAGES
    from pipeline.workflow.runner import Runner

    factory = Path(__file__).resolve().parent.parent / "data/factories/guided_diffusion_tiny.py"
    (tmp_path / "d" / "c0").mkdir(parents=True)
    (tmp_path / "d" / "c1").mkdir(parents=True)
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("c0", "c1"):
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "d" / c / f"{i}.png")
    wf = tmp_path / "wf.yaml"
    wf.write_text(f"""
name: adm
output_dir: out
stages:
  - name: ex
    stage: extract
    model: {{kind: factory, factory: "{factory}:tiny_adm", options: {{image_size: 32, in_channels: 3}}}}
    dataset: {{reader: imagefolder, root: d, split: all}}
    blocks: [24, 19]
    timesteps: [150]
    pool: {{size: 1}}
""")
    Runner(load_workflow(wf, STAGES), progress=False).run()
    root = zarr.open_group(str(tmp_path / "out/ex.zarr"), mode="r")
    assert sorted(name for name, _ in root["blocks"].groups()) == ["middle_block", "output_blocks.4"]
    assert root["blocks/output_blocks.4/activations"].shape == (6, 1, 32, 1, 1)
    assert root["class_name"][:].tolist() == ["c0", "c1"]
