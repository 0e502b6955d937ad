"""Stable Diffusion and DiT adapters on tiny random pipeline folders (saved offline, loaded back)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

pytest.importorskip("transformers")

from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL  # noqa: E402
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel  # noqa: E402
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel  # noqa: E402
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from helpers import tiny_vae, write_tiny_sd

from pipeline.workflow.config import load_workflow  # noqa: E402
from stages import STAGES
from pipeline.datasets import DatasetConfig, open_dataset, preprocess  # noqa: E402
from pipeline.datasets.preprocess import Preprocessing  # noqa: E402
from pipeline.errors import ModelError  # noqa: E402
from pipeline.models import Condition, ModelConfig, load_model  # noqa: E402
from pipeline.noise import sample_noise  # noqa: E402
from pipeline.workflow.runner import Runner  # noqa: E402

# ----------------------------------------------------------------- tiny pipeline folders


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_dit")
    torch.manual_seed(1)
    # out_channels = 2 x in_channels: learned sigma, as in the released DiT checkpoints
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=10).save_pretrained(folder / "transformer")
    tiny_vae().save_pretrained(folder / "vae")
    DDPMScheduler().save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "DiTTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"]}))
    return folder


@pytest.fixture(scope="module")
def sd(sd_folder):
    return load_model(ModelConfig(kind="sd", path=str(sd_folder)))


@pytest.fixture(scope="module")
def dit(dit_folder):
    return load_model(ModelConfig(kind="dit", path=str(dit_folder)))


def run_extract(folder: Path, model: str, blocks: str, conditioning: str) -> Path:
    wf = folder / "wf.yaml"
    wf.write_text(textwrap.dedent(f"""\
        name: t
        output_dir: out
        stages:
          - name: ex
            stage: extract
            model: {model}
            dataset: {{reader: digits, split: test, limit: 5}}
            blocks: {blocks}
            timesteps: [100, 700]
            conditioning: {conditioning}
            dtype: float32
            batch_size: 3
        """))
    Runner(load_workflow(wf, STAGES), progress=False).run()
    return folder / "out" / "ex.zarr"


def hooked(module, names):
    captured, handles = {}, []
    modules = dict(module.named_modules())
    for n in names:
        handles.append(modules[n].register_forward_hook(
            lambda m, i, o, n=n: captured.__setitem__(n, (o[0] if isinstance(o, tuple) else o).detach())))
    return captured, handles


# ----------------------------------------------------------------- Stable Diffusion


def test_sd_schedule_is_the_folders_scaled_linear(sd):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    np.testing.assert_allclose(sd.alphas_cumprod.numpy(), torch.cumprod(1 - betas, 0).numpy(), rtol=1e-5)
    assert sd.preprocessing.size == 16 and sd.preprocessing.channels == 3
    assert (sd.latent_channels, sd.latent_size) == (4, 8)


def test_sd_blocks_list_unet_blocks_with_shapes(sd):
    shapes = {b.name: b.shape for b in sd.blocks()}
    assert shapes["down_blocks.0.attentions.0"] == (8, 8, 8)
    assert shapes["down_blocks.0.resnets.0"] == (8, 8, 8)
    assert shapes["down_blocks.0"] == (8, 4, 4)  # after its downsampler
    assert shapes["mid_block"] == (16, 4, 4)
    assert shapes["up_blocks.1.attentions.0"] == (8, 8, 8)
    order = [b.name for b in sd.blocks()]
    assert order.index("down_blocks.0") < order.index("mid_block") < order.index("up_blocks.0")


def test_sd_encode_is_scaled_vae_mean(sd, sd_folder):
    vae = AutoencoderKL.from_pretrained(sd_folder / "vae")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = sd.encode(x)
    assert z.shape == (2, 4, 8, 8)
    with torch.no_grad():
        direct = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(z, direct)
    assert vae.config.scaling_factor == pytest.approx(0.18215)


def test_sd_forward_empty_prompt_vs_prompt_embeddings(sd):
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 900])
    emb = sd.encode_text(["a photo of a cat.", "a photo of a dog.", ""])
    assert emb.shape == (3, 77, 16)
    with torch.no_grad():
        empty = sd.forward(x, t, Condition("none"))
        texts = sd.forward(x, t, Condition("text", text=emb))
    assert empty.shape == texts.shape == (3, 4, 8, 8)
    assert not torch.allclose(empty[:2], texts[:2])
    torch.testing.assert_close(empty[2], texts[2])  # "" is the empty prompt
    assert torch.equal(sd.encode_text(["a photo of a cat."])[0], emb[0])  # cached, same values


def test_sd_rejects_class_conditioning_and_v_prediction(sd, sd_folder, tmp_path):
    with pytest.raises(ModelError, match="text-conditional"):
        sd.forward(torch.zeros(1, 4, 8, 8), torch.tensor([1]), Condition("class", labels=torch.tensor([0])))
    with pytest.raises(ModelError, match="v_prediction"):
        load_model(ModelConfig(kind="sd", path=str(sd_folder), scheduler={"prediction_type": "v_prediction"}))
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    with pytest.raises(ModelError, match="missing text_encoder/, tokenizer/"):
        load_model(ModelConfig(kind="sd", path=str(tmp_path)))


def test_sd_without_transformers_says_how_to_install(sd_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelError, match=r"pip install 'diffprobe\[sd\]'"):
        load_model(ModelConfig(kind="sd", path=str(sd_folder)))


def test_sd_extract_equals_direct_hooked_forward(sd_folder, tmp_path):
    out = run_extract(tmp_path, f"{{kind: sd, path: {sd_folder}}}", "[down_blocks.0.attentions.0, mid_block]", "none")
    root = zarr.open_group(str(out), mode="r")
    # everything below is independent of the adapter: raw components from the folder
    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(sd_folder / "vae").eval()
    tok = CLIPTokenizer.from_pretrained(sd_folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(sd_folder / "text_encoder").eval()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    reader = open_dataset(DatasetConfig(reader="digits", split="test", limit=5))
    names = ["down_blocks.0.attentions.0", "mid_block"]
    captured, handles = hooked(unet, names)
    try:
        with torch.no_grad():
            ids = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
            empty = text_encoder(ids)[0]
            for s in (0, 4):
                rec = reader.records[s]
                pixels = torch.from_numpy(preprocess(reader.load_image(rec), Preprocessing(size=16, channels=3)))[None]
                z = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
                for ti, t in enumerate([100, 700]):
                    eps = sample_noise(0, rec.image_id, 0, t, (4, 8, 8))[None]
                    x_t = (abar[t].sqrt() * z.double() + (1 - abar[t]).sqrt() * eps.double()).float()
                    unet(x_t, torch.tensor([t]), encoder_hidden_states=empty)
                    for n in names:
                        stored = root[f"blocks/{n}/activations"][s, ti]
                        np.testing.assert_allclose(stored, captured[n][0].numpy(), rtol=1e-4, atol=1e-5)
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------- DiT


def test_dit_blocks_are_token_grids_and_null_class_is_num_classes(dit):
    shapes = {b.name: b.shape for b in dit.blocks()}
    assert shapes == {"pos_embed": (16, 4, 4), "transformer_blocks.0": (16, 4, 4), "transformer_blocks.1": (16, 4, 4)}
    assert (dit.num_classes, dit.null_class) == (10, 10)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 800])
    with torch.no_grad():
        eps = dit.forward(x, t, Condition("null"))
        raw = dit.module(x, t, class_labels=torch.tensor([10, 10])).sample
        labelled = dit.forward(x, t, Condition("label", labels=torch.tensor([1, 2])))
    assert raw.shape == (2, 8, 8, 8) and eps.shape == (2, 4, 8, 8)
    torch.testing.assert_close(eps, raw[:, :4])  # learned sigma: eps is the first half
    assert not torch.allclose(eps, labelled)
    with pytest.raises(ModelError, match="class-conditional"):
        dit.forward(x, t, Condition("none"))


def test_dit_token_grid_is_row_major_patch_order(dit):
    tokens = torch.randn(2, 16, 16)
    grid = dit.feature_map("transformer_blocks.1", tokens)
    assert grid.shape == (2, 16, 4, 4)
    torch.testing.assert_close(grid[:, :, 1, 3], tokens[:, 1 * 4 + 3, :])


def test_dit_extract_equals_direct_hooked_forward(dit_folder, tmp_path):
    out = run_extract(tmp_path, f"{{kind: dit, path: {dit_folder}}}", "[transformer_blocks.0, transformer_blocks.1]",
                      "class")
    root = zarr.open_group(str(out), mode="r")
    model = DiTTransformer2DModel.from_pretrained(dit_folder / "transformer").eval()
    vae = AutoencoderKL.from_pretrained(dit_folder / "vae").eval()
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    reader = open_dataset(DatasetConfig(reader="digits", split="test", limit=5))
    names = ["transformer_blocks.0", "transformer_blocks.1"]
    captured, handles = hooked(model, names)
    try:
        with torch.no_grad():
            for s in (1, 3):
                rec = reader.records[s]
                pixels = torch.from_numpy(preprocess(reader.load_image(rec), Preprocessing(size=16, channels=3)))[None]
                z = vae.encode(pixels).latent_dist.mean * 0.18215
                for ti, t in enumerate([100, 700]):
                    eps = sample_noise(0, rec.image_id, 0, t, (4, 8, 8))[None]
                    x_t = (abar[t].sqrt() * z.double() + (1 - abar[t]).sqrt() * eps.double()).float()
                    model(x_t, torch.tensor([t]), class_labels=torch.tensor([rec.label]))
                    for n in names:
                        tokens = captured[n][0]  # (N, D), N = 4 x 4 patches in row-major order
                        stored = root[f"blocks/{n}/activations"][s, ti]  # (D, 4, 4)
                        np.testing.assert_allclose(stored.reshape(16, 16).T, tokens.numpy(), rtol=1e-4, atol=1e-5)
    finally:
        for h in handles:
            h.remove()


def test_dit_pixel_space_from_config_json(tmp_path):
    config = tmp_path / "dit.json"
    config.write_text(json.dumps({"num_attention_heads": 2, "attention_head_dim": 4, "in_channels": 3,
                                  "num_layers": 1, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 5}))
    adapter = load_model(ModelConfig(kind="dit", config=str(config)))
    assert adapter.preprocessing.size == 8 and adapter.latent_channels == 3
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(adapter.encode(x), x)
    assert [b.shape for b in adapter.blocks()] == [(8, 4, 4), (8, 4, 4)]
    config.write_text(json.dumps({"in_channels": 4, "num_layers": 1, "sample_size": 8, "num_embeds_ada_norm": 5}))
    with pytest.raises(ModelError, match="needs a VAE"):
        load_model(ModelConfig(kind="dit", config=str(config)))


# ----------------------------------------------------------------- CLI


def test_blocks_command_guesses_sd_and_dit(sd_folder, dit_folder):
    from click.testing import CliRunner

    from pipeline.cli.commands import main

    sd_out = CliRunner().invoke(main, ["blocks", str(sd_folder)])
    assert sd_out.exit_code == 0, sd_out.output
    assert "down_blocks.0.attentions.0" in sd_out.output and "input 4x8x8" in sd_out.output
    dit_out = CliRunner().invoke(main, ["blocks", str(dit_folder)])
    assert dit_out.exit_code == 0, dit_out.output
    assert "transformer_blocks.1" in dit_out.output and "(16, 4, 4)" in dit_out.output


# ----------------------------------------------------------------- precision and block discovery


@pytest.mark.parametrize("kind", ["sd", "dit"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_compute_is_diffusers_whole_module_cast(sd_folder, dit_folder, kind, dtype):
    """diffusers' own convention: the module in the dtype (its forward casts the timestep
    embedding), x_t fed in it; the VAE and text encoder stay float32."""
    folder = sd_folder if kind == "sd" else dit_folder
    half = load_model(ModelConfig(kind=kind, path=str(folder)), dtype=dtype)
    full = load_model(ModelConfig(kind=kind, path=str(folder)))
    want = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    assert {p.dtype for p in half.module.parameters()} == {want} and half.precision.input_dtype == want
    assert next(half.vae.vae.parameters()).dtype == torch.float32
    block = half.blocks()[len(half.blocks()) // 2]
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([50, 600])
    cond = Condition("none") if kind == "sd" else Condition("class", labels=torch.tensor([1, 4]))
    outs = []
    for adapter in (half, full):
        captured, handles = hooked(adapter.module, [block.name])
        with torch.no_grad():
            adapter.run(x, t, cond)
        for h in handles:
            h.remove()
        outs.append(captured[block.name].float())
    assert outs[0].dtype == torch.float32 and outs[0].shape == outs[1].shape
    error = float((outs[0] - outs[1]).abs().max() / outs[1].abs().max())
    assert 0 < error < {"float16": 5e-3, "bfloat16": 4e-2}[dtype], error


def test_meta_discovery_of_sd_and_dit_equals_a_real_forward(sd, dit):
    for adapter in (sd, dit):
        on_meta = adapter.find_blocks()
        assert adapter.discovery == "meta"
        assert on_meta == adapter.find_blocks(meta=False)
    assert next(sd.text_encoder.parameters()).device.type == "cpu"  # never moved to meta
