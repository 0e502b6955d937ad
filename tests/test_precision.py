"""compute_dtype float16 / bfloat16 for each model kind, the way each model's own code does it.

The guided-diffusion-layout factory follows the reference's precision contract (float32
timestep embedding, ``convert_to_fp16`` on the block convolutions only, ``dtype``), so a
blanket ``module.half()`` fails on it exactly as it fails on a real ADM checkpoint.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.errors import ModelError
from pipeline.hooks import capture, run_truncated
from pipeline.models import Condition, ModelConfig, load_model
from pipeline.noise import sample_noise

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "data/factories/guided_diffusion_tiny.py"
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def tiny_adm_config(**options) -> ModelConfig:
    return ModelConfig(kind="factory", factory=f"{TINY}:tiny_adm", options={"image_size": 32, "in_channels": 3} | options)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: the error on the scale of the block's activations."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_guided_layout_half_keeps_the_reference_float32_parts(dtype):
    adapter = load_model(tiny_adm_config(), dtype=dtype)
    net = adapter.module
    assert net.dtype == HALF[dtype] and adapter.precision.input_dtype == torch.float32
    assert net.input_blocks[0][0].weight.dtype == HALF[dtype]          # block convolutions converted
    assert net.middle_block[1].qkv.weight.dtype == HALF[dtype]
    assert net.time_embed[0].weight.dtype == torch.float32              # embeddings, norms, head stay float32
    assert net.input_blocks[1][0].emb_layers[1].weight.dtype == torch.float32
    assert net.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32
    assert net.out[2].weight.dtype == torch.float32
    numbered = {b.paper_number: b for b in adapter.blocks() if b.paper_number}
    assert sorted(numbered) == list(range(1, 38)) and numbered[24].shape == (32, 2, 2)

    x, t = torch.randn(2, 3, 32, 32), torch.tensor([90, 300])
    with capture(net, ["output_blocks.4"]) as got:
        eps = adapter.run(x, t, Condition("none"))
    assert eps.dtype == torch.float32 and eps.shape == (2, 3, 32, 32)  # learned sigma dropped
    assert got["output_blocks.4"].dtype == HALF[dtype]
    fp32 = load_model(tiny_adm_config())
    with capture(fp32.module, ["output_blocks.4"]) as want:
        eps32 = fp32.run(x, t, Condition("none"))
    tol = {"float16": 5e-3, "bfloat16": 4e-2}[dtype]
    assert relative_error(got["output_blocks.4"], want["output_blocks.4"]) < tol
    assert relative_error(eps, eps32) < tol


def test_generic_factory_module_runs_under_autocast():
    adapter = load_model(ModelConfig(kind="factory", factory=f"{ROOT}/data/factories/reference_cnn.py:reference_cnn",
                                     options={"image_size": 16, "in_channels": 1, "timestep_free": True}),
                         dtype="bfloat16")
    assert adapter.precision.autocast and next(adapter.module.parameters()).dtype == torch.float32
    x = torch.randn(2, 1, 16, 16)
    name = adapter.blocks()[0].name
    with capture(adapter.module, [name]) as got:
        adapter.run(x, torch.zeros(2, dtype=torch.long), Condition("none"))
    assert got[name].dtype == torch.bfloat16
    assert adapter.provenance()["precision"]["method"] == "torch.autocast(bfloat16)"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_diffusers_unet_casts_whole_module_and_agrees_with_float32(tiny_unet_json, dtype):
    cfg = ModelConfig(config=str(tiny_unet_json), null_class=10)
    half, full = load_model(cfg, dtype=dtype), load_model(cfg)
    assert {p.dtype for p in half.module.parameters()} == {HALF[dtype]}
    assert half.precision.input_dtype == HALF[dtype]
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 400])
    cond = Condition("class", labels=torch.tensor([3, 7]))
    with capture(half.module, ["mid_block"]) as got:
        half.run(x, t, cond)
    with capture(full.module, ["mid_block"]) as want:
        full.run(x, t, cond)
    assert relative_error(got["mid_block"], want["mid_block"]) < {"float16": 5e-3, "bfloat16": 4e-2}[dtype]


def test_half_on_a_blanket_cast_model_is_one_line_naming_model_and_setting(tmp_path):
    """A factory module that is not in guided-diffusion's convention but breaks under
    autocast: the failure is a ModelError naming the model, the dtype and the fix."""
    factory = tmp_path / "picky.py"
    factory.write_text(
        "import torch\n"
        "class Picky(torch.nn.Module):\n"
        "    image_size, in_channels = 8, 1\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)\n"
        "    def forward(self, x, t):\n"
        "        h = self.conv(x)\n"
        "        if h.dtype != torch.float32:\n"
        "            raise RuntimeError(f'expected float32, got {h.dtype}')\n"
        "        return h[:, :1]\n"
        "def picky():\n"
        "    return Picky()\n"
    )
    adapter = load_model(ModelConfig(kind="factory", factory=f"{factory}:picky"), dtype="float16")
    with pytest.raises(ModelError) as info:
        adapter.run(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), Condition("none"))
    message = str(info.value)
    assert "\n" not in message and "picky.py:picky" in message and "failed in float16" in message
    assert "expected float32, got torch.float16" in message and "set compute_dtype: float32" in message


def fake_imagenet(root: Path, per_class: int = 1) -> list[str]:
    """train/<wnid>/<wnid>_<k>.JPEG at 256x256, so every resize recipe leaves the pixels as decoded."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for wnid in ("n01440764", "n01443537"):
        for k in range(per_class):
            path = root / "train" / wnid / f"{wnid}_{k}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            smooth = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(smooth).resize((256, 256), Image.BILINEAR).save(path, quality=95)
    return sorted(str(p.relative_to(root)) for p in root.glob("train/*/*.JPEG"))


def test_imagenet_adm_template_extracts_in_float16_on_cpu(tmp_path):
    """The shipped template's extract stage, end to end in its own compute_dtype (float16),
    with the tiny guided-diffusion-layout factory at the real model's size and a fake ImageNet."""
    import zarr
    from PIL import Image

    from pipeline.workflow.config import load_workflow
    from pipeline.workflow.runner import Runner
    from stages import STAGES

    data = tmp_path / "ILSVRC2012"
    image_ids = fake_imagenet(data)
    wf = yaml.safe_load((ROOT / "workflows/imagenet-adm.yaml").read_text())
    stage = next(s for s in wf["stages"] if s["name"] == "train_features")
    assert stage["compute_dtype"] == "float16" and stage["model"]["options"]["image_size"] == 256
    stage["model"]["factory"] = f"{TINY}:tiny_adm"
    # model_channels 4: float16 convolutions have no fast CPU kernel, so keep them narrow
    stage["model"]["options"] = {"image_size": 256, "in_channels": 3, "model_channels": 4}
    stage["dataset"]["root"] = str(data)
    stage.update(device="cpu", num_workers=0)  # the test machine's, not the model's, settings
    # the centre view only: the precision is the point here (augmented views: test_augment_views.py)
    stage.update(views=1, augment=None)
    wf.update(stages=[stage], output_dir=str(tmp_path / "runs"))
    path = tmp_path / "imagenet-adm.yaml"
    path.write_text(yaml.safe_dump(wf))
    Runner(load_workflow(path, STAGES), progress=False).run()

    from pipeline import store

    out = tmp_path / "runs/train_features.zarr"
    root = zarr.open_group(str(out), mode="r")
    prov = store.read_attrs(out)["provenance"]
    assert prov["compute_dtype"] == "float16"
    assert prov["model"]["precision"]["method"].startswith("guided-diffusion convert_to_fp16")
    assert root["image_id"][:].tolist() == image_ids
    paper = {19: "middle_block", 24: "output_blocks.4", 30: "output_blocks.10"}
    names = {b: paper[b] for b in stage["blocks"]}
    pool = (stage.get("pool") or {}).get("size")
    timesteps = stage["timesteps"]

    # Independent forwards: the same network built by the factory function itself, hooked
    # directly, once in float32 and once converted as guided-diffusion's scripts do.
    torch.manual_seed(0)  # the adapter seeds model.seed (0) before calling the factory
    sys.path.insert(0, str(TINY.parent))
    try:
        from guided_diffusion_tiny import tiny_adm
    finally:
        sys.path.remove(str(TINY.parent))
    full = tiny_adm(image_size=256, model_channels=4).eval()
    half = copy.deepcopy(full)
    half.convert_to_fp16()
    half.dtype = torch.float16
    abar = torch.tensor(prov["alphas_cumprod"], dtype=torch.float64)
    x0 = torch.stack([torch.from_numpy(np.asarray(Image.open(data / i).convert("RGB"), dtype=np.float32))
                      .permute(2, 0, 1) / 127.5 - 1 for i in image_ids])
    worst, same = {}, {}
    for ti, t in enumerate(timesteps):
        eps = torch.stack([sample_noise(stage.get("seed", 0), i, 0, t, (3, 256, 256))
                           for i in image_ids])
        a = abar[t].float()  # in float32, as the README's x_t recipe: float16 compute turns
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # a 1e-7 change of x_t into ~1e-3 of noise
        tt = torch.full((len(image_ids),), t)
        outs = {}
        for tag, net in (("fp32", full), ("fp16", half)):
            with torch.no_grad(), capture(net, list(names.values()), stop_after=names[max(names)]) as got:
                run_truncated(lambda net=net: net(x_t, tt))  # noqa: B023 -- called here, in this iteration
            outs[tag] = {n: v.float() if pool is None else torch.nn.functional.adaptive_avg_pool2d(v.float(), pool)
                         for n, v in got.items()}
        for name in names.values():
            stored = torch.from_numpy(np.asarray(root[f"blocks/{name}/activations"][:, ti]).astype(np.float32))
            assert stored.shape == outs["fp32"][name].shape
            # the reference's own fp16 forward, up to float16 storage rounding and the few ulps a
            # different batch composition gives
            same[name] = max(same.get(name, 0.0), relative_error(stored, outs["fp16"][name]))
            worst[name] = max(worst.get(name, 0.0), relative_error(stored, outs["fp32"][name]))
    print(f"stored float16-compute vs direct float16: {same}; vs direct float32: {worst}")
    assert max(same.values()) < 1e-3, same
    # float16 compute against float32 compute: float16 tolerance (eps 2^-10 ~ 1e-3 per op)
    assert max(worst.values()) < 1e-2, worst
    assert min(worst.values()) > 0, "float16 compute must differ from float32 somewhere"


@pytest.mark.skipif(not os.environ.get("DIFFPROBE_GUIDED_DIFFUSION"),
                    reason="set DIFFPROBE_GUIDED_DIFFUSION to a guided-diffusion clone to run")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_real_guided_diffusion_unet_in_half(dtype):
    """openai/guided-diffusion's own UNetModel (random weights, small width): diffprobe's
    float16 equals the reference's create_model(use_fp16=True) + convert_to_fp16()."""
    sys.path.insert(0, os.environ["DIFFPROBE_GUIDED_DIFFUSION"])
    from guided_diffusion.script_util import create_model

    kwargs = {"image_size": 64, "num_channels": 32, "num_res_blocks": 2, "channel_mult": "", "learn_sigma": True,
              "class_cond": False, "use_checkpoint": False, "attention_resolutions": "16,8", "num_heads": 4,
              "num_head_channels": 8, "num_heads_upsample": -1, "use_scale_shift_norm": True, "dropout": 0.0,
              "resblock_updown": True, "use_new_attention_order": False}
    torch.manual_seed(0)
    model = create_model(use_fp16=False, **kwargs)
    from pipeline.models.factory import FactoryAdapter

    adapter = FactoryAdapter(ModelConfig(kind="factory", factory="guided_diffusion:create_model",
                                         options={"image_size": 64, "in_channels": 3}), copy.deepcopy(model))
    adapter.precision = adapter.set_compute_dtype(HALF[dtype])
    assert adapter.blocks() and adapter.discovery == "meta"
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([90, 300])
    with torch.no_grad(), capture(adapter.module, ["output_blocks.4"]) as got:
        adapter.run(x, t, Condition("none"))
    with torch.no_grad(), capture(model, ["output_blocks.4"]) as want32:
        model(x, t)
    if dtype == "float16":
        reference = create_model(use_fp16=True, **kwargs)
        reference.load_state_dict(model.state_dict())
        reference.convert_to_fp16()
        with torch.no_grad(), capture(reference, ["output_blocks.4"]) as want16:
            reference(x, t)
        torch.testing.assert_close(got["output_blocks.4"], want16["output_blocks.4"], rtol=0, atol=0)
    assert relative_error(got["output_blocks.4"], want32["output_blocks.4"]) < {"float16": 5e-3,
                                                                                  "bfloat16": 4e-2}[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_meta_discovery_equals_a_real_forward(tiny_unet_json, dtype):
    configs = [ModelConfig(config=str(tiny_unet_json), null_class=10), tiny_adm_config(num_classes=3),
               ModelConfig(kind="factory", factory=f"{ROOT}/data/factories/reference_cnn.py:reference_cnn",
                           options={"image_size": 16, "in_channels": 1, "timestep_free": True})]
    for cfg in configs:
        adapter = load_model(cfg, dtype=dtype)
        on_meta = adapter.find_blocks()
        assert adapter.discovery == "meta", cfg
        assert on_meta == adapter.find_blocks(meta=False) and adapter.discovery == "forward"
        assert all(p.device.type == "cpu" for p in adapter.module.parameters())  # the weights stay
    assert len(on_meta) == 5 and on_meta[0].shape[1:] == (16, 16)


def test_a_forward_meta_tensors_cannot_run_falls_back(tmp_path):
    factory = tmp_path / "datadep.py"
    factory.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    image_size, in_channels = 8, 1\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)\n"
        "    def forward(self, x, t):\n"
        "        h = self.conv(x)\n"
        "        return h[:, :1] if bool(h.sum() >= 0) else -h[:, :1]  # data-dependent: no meta run\n"
        "def net():\n    return Net()\n")
    adapter = load_model(ModelConfig(kind="factory", factory=f"{factory}:net"))
    assert [b.name for b in adapter.blocks()] == ["conv"] and adapter.discovery == "forward"


def test_a_factory_that_converted_the_model_itself():
    sys.path.insert(0, str(TINY.parent))
    try:
        from guided_diffusion_tiny import TinyGuidedUNet
    finally:
        sys.path.remove(str(TINY.parent))
    from pipeline.models.factory import FactoryAdapter

    def adapter_for(dtype, converted=True):
        net = TinyGuidedUNet(use_fp16=True)
        if converted:
            net.convert_to_fp16()  # as create_model(use_fp16=True) + the reference scripts leave it
        adapter = FactoryAdapter(tiny_adm_config(), net)
        adapter.precision = adapter.set_compute_dtype(dtype)
        return adapter

    for converted in (True, False):  # create_model(use_fp16=True) alone sets dtype, not the weights
        adapter = adapter_for(torch.float16, converted)
        assert "by the factory" in adapter.precision.method and adapter.blocks()
        assert adapter.module.input_blocks[0][0].weight.dtype == torch.float16
        eps = adapter.run(torch.randn(1, 3, 32, 32), torch.tensor([5]), Condition("none"))
        assert eps.dtype == torch.float32 and torch.isfinite(eps).all()
    with pytest.raises(ModelError, match="built the model in float16 .* but compute_dtype is float32: set "
                                         "compute_dtype: float16"):
        adapter_for(torch.float32)


def test_classify_in_bfloat16_with_a_guided_layout_model(tmp_path):
    """The Diffusion Classifier through adapter.run: bfloat16 errors track float32 ones."""
    import zarr

    from pipeline.workflow.config import load_workflow
    from pipeline.workflow.runner import Runner
    from stages import STAGES

    errors = {}
    for dtype in ("float32", "bfloat16"):
        folder = tmp_path / dtype
        folder.mkdir()
        (folder / "wf.yaml").write_text(f"""name: t
output_dir: out
stages:
  - name: c
    stage: classify
    model: {{kind: factory, factory: "{TINY}:tiny_adm", options: {{image_size: 32, in_channels: 1, num_classes: 10}}}}
    dataset: {{reader: digits, split: test, limit: 3}}
    n_timesteps: 4
    batch_size: 20
    compute_dtype: {dtype}
""")
        Runner(load_workflow(folder / "wf.yaml", STAGES), progress=False).run()
        errors[dtype] = zarr.open_group(str(folder / "out/c.zarr"), mode="r")["error_l2"][:]
    assert errors["float32"].shape == (3, 10, 4) and np.isfinite(errors["float32"]).all()
    assert not np.array_equal(errors["bfloat16"], errors["float32"])
    np.testing.assert_allclose(errors["bfloat16"], errors["float32"], rtol=2e-2)
