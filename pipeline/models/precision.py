"""How a model computes in float16 / bfloat16: each kind the way its own code does it.

``compute_dtype`` is applied by ``load_model`` through the adapter's
``set_compute_dtype``, which returns a :class:`Precision` saying what was done:

- diffusers models (``UNet2DModel``, ``UNet2DConditionModel``, DiT): the whole module in
  the dtype, as ``from_pretrained(torch_dtype=...)`` leaves it (modules a class lists in
  ``_keep_in_fp32_modules`` stay float32); x_t is fed in that dtype. Their forwards
  cast the float32 sinusoidal timestep embedding to the module's dtype themselves.
- guided-diffusion layouts (``input_blocks`` / ``middle_block`` / ``output_blocks``,
  a ``convert_to_fp16`` method and a ``dtype`` attribute, i.e. ``UNetModel``):
  float16 is the model's own ``convert_to_fp16()`` (convolutions of the three block
  lists only; ``time_embed``, the resblocks' embedding projections, the norms and the
  output head stay float32) with ``module.dtype = float16``, which the forward uses
  to cast h before the body and back to x's dtype after it. x_t stays float32, as in
  the reference scripts. guided-diffusion has no bfloat16 mode: for bfloat16 the
  same convolutions are converted to bfloat16 and ``module.dtype`` set to match --
  the float16 recipe with the other half type, diffprobe's choice.
- any other factory module: parameters stay float32 and the forward runs under
  ``torch.autocast`` on the model's device in the dtype (x_t float32), since a module
  we did not write cannot be assumed to survive a blanket cast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import ModelError

GUIDED_BLOCK_LISTS = ("input_blocks", "middle_block", "output_blocks")


@dataclass(frozen=True)
class Precision:
    """What a model computes in and how that was arranged.

    dtype: the compute dtype asked for.
    input_dtype: the dtype x_t is fed to the forward in.
    autocast: whether forwards run under ``torch.autocast(device, dtype)``.
    method: a short description, recorded in the store's provenance.
    """

    dtype: torch.dtype
    input_dtype: torch.dtype
    autocast: bool = False
    method: str = "float32"

    def context(self, device: torch.device):
        """The context a forward runs in: autocast where chosen, else nothing."""
        if self.autocast and device.type != "meta":
            return torch.autocast(device_type=device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def to_attrs(self) -> dict:
        return {"compute_dtype": str(self.dtype).removeprefix("torch."), "method": self.method}


FLOAT32 = Precision(torch.float32, torch.float32)


def cast_like_diffusers(module: nn.Module, dtype: torch.dtype) -> Precision:
    """The whole module in ``dtype`` except the class's ``_keep_in_fp32_modules``.

    ``nn.Module.to`` is called directly: diffusers' own ``ModelMixin.to`` does the same
    cast but warns on every call in diffusers 0.42, even when no module is kept in float32.
    """
    if dtype == torch.float32:
        nn.Module.to(module, dtype=torch.float32)
        return FLOAT32
    nn.Module.to(module, dtype=dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    for name, sub in module.named_modules():
        if name and any(pattern in name for pattern in keep):  # diffusers' own matching rule
            nn.Module.to(sub, dtype=torch.float32)
    method = "whole module cast (diffusers)" + (f", {', '.join(keep)} kept float32" if keep else "")
    return Precision(dtype, dtype, method=method)


def is_guided_diffusion(module: nn.Module) -> bool:
    """guided-diffusion's ``UNetModel`` convention: the three block lists, ``convert_to_fp16``, ``dtype``."""
    return (all(hasattr(module, a) for a in GUIDED_BLOCK_LISTS) and callable(getattr(module, "convert_to_fp16", None))
            and isinstance(getattr(module, "dtype", None), torch.dtype))


def _convs_to(dtype: torch.dtype):
    def convert(layer: nn.Module) -> None:
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            layer.weight.data = layer.weight.data.to(dtype)
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.to(dtype)

    return convert


def guided_diffusion_precision(module: nn.Module, dtype: torch.dtype) -> Precision:
    """Apply guided-diffusion's mixed precision (see the module docstring); x_t stays float32."""
    if module.dtype != torch.float32:
        # built with create_model(use_fp16=True): convert (again: idempotent) in case the factory did not
        if module.dtype == dtype == torch.float16:
            module.convert_to_fp16()
            return Precision(dtype, torch.float32, method="guided-diffusion convert_to_fp16 (use_fp16 by the factory)")
        raise ModelError(
            f"the factory built the model in {str(module.dtype)[6:]} (guided-diffusion use_fp16) but compute_dtype "
            f"is {str(dtype)[6:]}: set compute_dtype: {str(module.dtype)[6:]}, or build the model in float32 and "
            "let compute_dtype convert it"
        )
    if dtype == torch.float32:
        return FLOAT32
    if dtype == torch.float16:
        module.convert_to_fp16()
        method = "guided-diffusion convert_to_fp16: block convolutions float16, embeddings and norms float32"
    else:
        for name in GUIDED_BLOCK_LISTS:
            getattr(module, name).apply(_convs_to(dtype))
        method = ("guided-diffusion convert_to_fp16 recipe in bfloat16: block convolutions bfloat16, "
                  "embeddings and norms float32")
    module.dtype = dtype
    return Precision(dtype, torch.float32, method=method)


def autocast_precision(dtype: torch.dtype) -> Precision:
    """Generic modules: float32 parameters, forward under ``torch.autocast``."""
    if dtype == torch.float32:
        return FLOAT32
    return Precision(dtype, torch.float32, autocast=True, method=f"torch.autocast({str(dtype)[6:]})")
