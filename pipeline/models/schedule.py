"""Noise schedules through diffusers' DDPMScheduler (one place that computes abar_t)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from pipeline.models.imports import diffusers_module

DEFAULT_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def load_scheduler_config(folder: Path | None, overrides: dict) -> dict:
    """The folder's ``scheduler/scheduler_config.json`` if present, else DDPM linear; then overrides."""
    cfg = dict(DEFAULT_SCHEDULER)
    if folder is not None:
        path = Path(folder) / "scheduler" / "scheduler_config.json"
        if path.exists():
            saved = json.loads(path.read_text())
            cfg.update({k: v for k, v in saved.items() if not k.startswith("_")})
    cfg.update(overrides)
    return cfg


def alphas_cumprod(cfg: dict) -> torch.Tensor:
    """abar_t for t = 0..T-1 as float64, via diffusers' DDPMScheduler."""
    DDPMScheduler = diffusers_module("diffusers.schedulers.scheduling_ddpm").DDPMScheduler

    # inspect.signature, not __code__.co_varnames: register_to_config wraps __init__ in (*args, **kwargs)
    known = inspect.signature(DDPMScheduler.__init__).parameters
    sched = DDPMScheduler(**{k: v for k, v in cfg.items() if k in known})
    return sched.alphas_cumprod.to(torch.float64)
