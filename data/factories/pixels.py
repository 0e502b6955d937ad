"""The images themselves as a "network": the raw-pixel baseline for probes.

One capturable block, ``image``, whose output is the preprocessed image the
other models see (``(in_channels, image_size, image_size)``, values in the
adapter's ``value_range``). Stored, pooled and probed like any block, it answers
"how much do the diffusion features add over the pixels they were computed
from?"::

    - name: pixels
      stage: extract
      model: {kind: factory, factory: ../data/factories/pixels.py:pixels,
              options: {image_size: 16, in_channels: 1, timestep_free: true}}
      dataset: {reader: digits, split: all}
      blocks: [image]
      timesteps: [0]

``timestep_free`` makes the adapter call ``module(x)`` on the clean image: no
noise, no timestep, one stored timestep ``0``.
"""

from __future__ import annotations

import torch
from torch import nn


class Pixels(nn.Module):
    """``forward(x)`` returns ``x`` (B, C, H, W) through the one block ``image``."""

    def __init__(self, image_size: int, in_channels: int):
        super().__init__()
        self.image_size, self.in_channels = image_size, in_channels
        self.image = nn.Identity()
        # The adapter reads the device and dtype from the first parameter; an empty one
        # gives it both without changing the output (and hashes to the same weights).
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.image(x)


def pixels(image_size: int = 16, in_channels: int = 1) -> nn.Module:
    """Factory entry point: ``data/factories/pixels.py:pixels``.

    Parameters
    ----------
    image_size, in_channels : the input (and stored map) size and channels.
    """
    return Pixels(image_size, in_channels).eval()
