"""The embedded default model (data/models/digits-ddpm): it ships, loads offline, and is trained.

Numbers are checked against a random-init twin built from data/models/digits-ddpm.json,
and against chance for the Diffusion Classifier, on the held-out digits split
(i % 5 == 0) that the training script never sees.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.datasets.digits import DigitsReader
from pipeline.datasets.preprocess import Preprocessing, preprocess

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
MODEL_DIR = MODELS / "digits-ddpm"
NULL_CLASS = 10


@pytest.fixture(scope="module")
def heldout():
    """(n, 1, 16, 16) float32 held-out digits in [-1, 1] and (n,) labels, as extraction sees them."""
    reader = DigitsReader(split="test")
    prep = Preprocessing(size=16, channels=1, value_range=(-1, 1))
    x = np.stack([preprocess(reader.load_image(r), prep) for r in reader.records])
    y = np.array([r.label for r in reader.records])
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.fixture(scope="module")
def trained():
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(MODEL_DIR / "unet", local_files_only=True).eval()
    scheduler = DDPMScheduler.from_pretrained(MODEL_DIR / "scheduler", local_files_only=True)
    return unet, scheduler


def test_shipped_files_exist_and_are_small():
    for rel in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "scheduler/scheduler_config.json", "README.md", "samples.png"):
        assert (MODEL_DIR / rel).is_file(), rel
    assert (MODELS / "train_digits.py").is_file()
    total = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert total < 10 * 2**20, f"digits-ddpm is {total / 2**20:.1f} MiB; keep it a few MB"


def test_standalone_config_matches_shipped_unet(trained):
    unet, _ = trained
    standalone = json.loads((MODELS / "digits-ddpm.json").read_text())
    assert standalone == json.loads((MODEL_DIR / "unet" / "config.json").read_text())
    assert unet.config.num_class_embeds == NULL_CLASS + 1
    assert (unet.config.sample_size, unet.config.in_channels) == (16, 1)


def test_weights_load_without_network(trained, monkeypatch):
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = load_file(MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors")
    unet, _ = trained
    assert set(state) == set(unet.state_dict())
    for name, tensor in unet.state_dict().items():
        assert torch.equal(state[name], tensor), name
    twin = UNet2DModel.from_config(json.loads((MODELS / "digits-ddpm.json").read_text()))
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in state.items()}


def test_samples_png_is_a_grid_of_ten_rows():
    with Image.open(MODEL_DIR / "samples.png") as img:
        img.verify()
    with Image.open(MODEL_DIR / "samples.png") as img:
        pixels = np.asarray(img.convert("L"))
    assert pixels.shape[0] >= 10 * 16 and pixels.std() > 10  # ten rows of 16x16 cells, not blank


@torch.no_grad()
def _eps_mse(unet, scheduler, x0, labels, timesteps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    errors = []
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=generator)
        tt = torch.full((len(x0),), t)
        pred = unet(scheduler.add_noise(x0, noise, tt), tt, class_labels=labels).sample
        errors.append((pred - noise).pow(2).mean().item())
    return float(np.mean(errors))


def test_denoises_heldout_digits_far_better_than_random_init(trained, heldout):
    from diffusers import UNet2DModel

    unet, scheduler = trained
    torch.manual_seed(0)
    random_unet = UNet2DModel.from_config(json.loads((MODELS / "digits-ddpm.json").read_text())).eval()
    x, y = heldout[0][:256], heldout[1][:256]
    timesteps = (100, 400, 800)
    mse_trained = _eps_mse(unet, scheduler, x, y, timesteps)
    mse_null = _eps_mse(unet, scheduler, x, torch.full_like(y, NULL_CLASS), timesteps)
    mse_random = _eps_mse(random_unet, scheduler, x, y, timesteps)
    assert mse_trained < 0.5 * mse_random, (mse_trained, mse_random)
    assert mse_trained < 0.1, mse_trained  # a trained eps-predictor, not just a smaller random one
    assert mse_null < 0.5 * mse_random, (mse_null, mse_random)  # works unconditionally too


@torch.no_grad()
def test_diffusion_classifier_is_well_above_chance(trained, heldout):
    """argmin_c mean ||eps - eps_theta(x_t, t, c)||^2 with the same (t, eps) for every class."""
    unet, scheduler = trained
    x, y = heldout[0][:30], heldout[1][:30]
    timesteps = torch.arange(50, 1000, 100)  # 10 trials
    k, classes = len(timesteps), 10
    noise = torch.randn((len(x), k, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    errors = torch.empty(len(x), classes)
    labels = torch.arange(classes).repeat_interleave(k)  # rows ordered (class, trial)
    for i in range(len(x)):
        xt = scheduler.add_noise(x[i].expand(k, 1, 16, 16), noise[i], timesteps).repeat(classes, 1, 1, 1)
        pred = unet(xt, timesteps.repeat(classes), class_labels=labels).sample
        errors[i] = (pred - noise[i].repeat(classes, 1, 1, 1)).pow(2).mean(dim=(1, 2, 3)).view(classes, k).mean(1)
    accuracy = (errors.argmin(dim=1) == y).float().mean().item()
    assert accuracy >= 0.7, f"Diffusion Classifier accuracy {accuracy:.2f} on 30 held-out digits (chance 0.1)"
