"""Model adapters and the one registry that maps ``model.kind`` to a loader."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.errors import ModelError, did_you_mean
from pipeline.models.base import BlockInfo, Condition, ModelAdapter
from pipeline.models.config import ModelConfig
from pipeline.models.remote import localize


def _unet2d(cfg: ModelConfig) -> ModelAdapter:
    from pipeline.models.unet2d import UNet2DAdapter

    return UNet2DAdapter(cfg)


def _factory(cfg: ModelConfig) -> ModelAdapter:
    from pipeline.models.factory import build_factory_adapter

    return build_factory_adapter(cfg)


def _sd(cfg: ModelConfig) -> ModelAdapter:
    from pipeline.models.sd import StableDiffusionAdapter

    return StableDiffusionAdapter(cfg)


def _dit(cfg: ModelConfig) -> ModelAdapter:
    from pipeline.models.dit import DiTAdapter

    return DiTAdapter(cfg)


#: model kind -> loader. The one registry; add new adapters here.
MODEL_KINDS: dict[str, Callable[[ModelConfig], ModelAdapter]] = {
    "unet2d": _unet2d,
    "factory": _factory,
    "sd": _sd,
    "dit": _dit,
}


def resolve_device(device: str) -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:N``; asking for CUDA without it is an error, never a fallback."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} requested but CUDA is not available here; use device: cpu")
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
        return dev
    raise ModelError(f"unknown device {device!r}; use cpu, cuda or cuda:N")


def planning_device(device: str) -> tuple[str | None, str | None]:
    """Where ``diffprobe plan`` builds the model: ``(None, None)`` when ``device`` exists here,
    ``("cpu", why)`` when a CUDA device is asked for on a machine without it (a login node
    planning a GPU workflow); any other device error is raised as it is."""
    try:
        resolve_device(device)
    except ModelError as exc:
        if not device.startswith("cuda"):
            raise
        return "cpu", str(exc).split(";")[0]
    return None, None


#: Names of the dtypes a model may compute in (and activations may be rounded to).
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(cfg: ModelConfig, device: str = "cpu", dtype: str = "float32") -> ModelAdapter:
    """Build the adapter for ``cfg`` on ``device``, computing in ``dtype``.

    The module is moved to the device, then the adapter applies ``dtype`` the way the
    model's own code expects (see ``pipeline.models.precision``); ``adapter.precision``
    says what was done and ``adapter.run`` feeds inputs accordingly.
    """
    if cfg.kind not in MODEL_KINDS:
        raise ModelError(
            f"unknown model kind {cfg.kind!r}{did_you_mean(cfg.kind, MODEL_KINDS)}; valid: {', '.join(MODEL_KINDS)}"
        )
    dev = resolve_device(device)
    local = localize(cfg)  # a model on object storage is read from a local copy
    adapter = MODEL_KINDS[cfg.kind](local)
    for name in ("path", "config"):
        if getattr(local, name) != getattr(cfg, name) and name in adapter.source:
            adapter.source[name] = str(getattr(cfg, name))  # provenance records the URL
    if next(adapter.module.parameters()).device != dev:
        nn.Module.to(adapter.module, device=dev)  # diffusers' ModelMixin.to warns on any call with a dtype
    adapter.precision = adapter.set_compute_dtype(TORCH_DTYPES[dtype])
    return adapter


__all__ = ["MODEL_KINDS", "TORCH_DTYPES", "planning_device", "BlockInfo", "Condition", "ModelAdapter", "ModelConfig", "load_model", "resolve_device"]
