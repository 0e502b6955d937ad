"""A toy network named like torchvision's ResNet (layer1 ... layer4), for template tests.

It takes the options the README's ResNet-50 factory takes (``weights``, ``image_size``,
``in_channels``), so a template's reference stage validates unchanged but for its path.
"""

import torch
from torch import nn


class ResNetLayers(nn.Module):
    def __init__(self, image_size: int, in_channels: int):
        super().__init__()
        self.image_size, self.in_channels = image_size, in_channels
        self.stem = nn.Conv2d(in_channels, 4, 7, stride=4, padding=3)  # 224 -> 56, as a ResNet's stem
        self.layer1 = nn.Conv2d(4, 4, 3, padding=1)
        self.layer2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.layer3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.layer4 = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x))))).mean((2, 3))


def resnet50(weights: str, image_size: int = 224, in_channels: int = 3) -> nn.Module:
    """Random weights; ``weights`` is accepted and ignored (no checkpoint in tests)."""
    return ResNetLayers(image_size, in_channels)
