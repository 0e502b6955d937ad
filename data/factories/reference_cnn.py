"""A small plain CNN (no timestep) to compare diffusion features against with CKA.

Four conv blocks (conv 3x3 + BatchNorm + ReLU, max-pool 2 after the first three),
a global average pool and a linear classifier, in torchvision ResNet's naming
(``stem``, ``layer1`` ... ``layer3``, ``avgpool``, ``fc``), so ``diffprobe blocks``
lists the same kind of names a ResNet gives. For 16x16 inputs the stored maps are::

    stem     (width,    16, 16)
    layer1   (2 width,   8,  8)
    layer2   (4 width,   4,  4)
    layer3   (4 width,   2,  2)
    avgpool  (4 width,   1,  1)

Store it with the extract stage through the factory adapter::

    model: {kind: factory, factory: ../data/factories/reference_cnn.py:reference_cnn,
            options: {image_size: 16, in_channels: 1, timestep_free: true}}
    timesteps: [0]

``timestep_free`` makes the adapter call ``module(x)`` on the clean image (no noise,
no timestep) and store a timestep coordinate of ``[0]``. Random weights are a
legitimate baseline for CKA (an untrained network's features); pass
``weights: path/to/state_dict.pt`` for trained ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class ConvBlock(nn.Module):
    """conv 3x3 -> BatchNorm -> ReLU, then max-pool 2 when ``downsample``."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.pool = nn.MaxPool2d(2) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.bn(self.conv(x))))


class ReferenceCNN(nn.Module):
    """Plain CNN classifier: ``forward(x)`` maps (B, in_channels, H, W) to (B, num_classes) logits."""

    def __init__(self, image_size: int = 16, in_channels: int = 1, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.image_size, self.in_channels = image_size, in_channels
        self.stem = ConvBlock(in_channels, width, downsample=False)
        self.layer1 = ConvBlock(width, 2 * width, downsample=True)
        self.layer2 = ConvBlock(2 * width, 4 * width, downsample=True)
        self.layer3 = ConvBlock(4 * width, 4 * width, downsample=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(h), 1))


def reference_cnn(image_size: int = 16, in_channels: int = 1, seed: int = 0, weights: str | None = None,
                  width: int = 16, num_classes: int = 10) -> nn.Module:
    """Factory entry point: ``data/factories/reference_cnn.py:reference_cnn``.

    Parameters
    ----------
    image_size, in_channels : the input the network takes (also read by the adapter).
    seed : seed of the random initialisation (without touching the global torch RNG).
    weights : optional path to a local ``state_dict`` (``torch.save(model.state_dict(), path)``).
    width, num_classes : channel width of the stem and classifier outputs.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ReferenceCNN(image_size, in_channels, width, num_classes)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"reference_cnn weights {str(path)!r} not found")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
