"""Per-sample deterministic noise and the forward process q(x_t | x_0).

The noise for one stored sample is a pure function of
``(seed, image_id, view, timestep)``: a CPU ``torch.Generator`` is seeded with the
first 63 bits of ``sha256("diffprobe-noise-v1|{seed}|{image_id}|{view}|{timestep}")``
and draws ``randn(shape)`` in float32. It therefore does not depend on batch size,
shard, device, dataset order or subsetting, and anyone can reproduce x_t::

    eps = sample_noise(seed, "digits/0005", view=0, timestep=100, shape=(1, 16, 16))
    x_t = sqrt(abar[100]) * x0 + sqrt(1 - abar[100]) * eps

where ``abar`` is the scheduler's ``alphas_cumprod`` (recorded in the store attrs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

NOISE_SCHEME = "diffprobe-noise-v1"


def noise_seed(seed: int, image_id: str, view: int, timestep: int) -> int:
    """The 63-bit generator seed for one (seed, image_id, view, timestep)."""
    key = f"{NOISE_SCHEME}|{int(seed)}|{image_id}|{int(view)}|{int(timestep)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def sample_noise(
    seed: int, image_id: str, view: int, timestep: int, shape: Sequence[int]
) -> torch.Tensor:
    """Standard normal noise ``shape`` float32 on CPU for one stored sample."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(noise_seed(seed, image_id, view, timestep))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def batch_noise(
    seed: int, image_ids: Sequence[str], views: Sequence[int], timesteps: Sequence[int], shape: Sequence[int]
) -> torch.Tensor:
    """Stack ``sample_noise`` for a batch: (B, *shape) float32 on CPU."""
    return torch.stack(
        [sample_noise(seed, i, v, t, shape) for i, v, t in zip(image_ids, views, timesteps, strict=True)]
    )


def q_sample(x0: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, computed in float32, per-sample t (B,)."""
    abar = alphas_cumprod.to(x0.device)[t.to(x0.device)].float().view(-1, *([1] * (x0.dim() - 1)))
    return abar.sqrt() * x0.float() + (1 - abar).sqrt() * eps.to(x0.device).float()
