"""A toy denoiser whose middle activations overflow float16 (max 65504) for tests."""

from torch import nn


class Overflow(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_size, self.in_channels = 8, 1
        self.first = nn.Conv2d(1, 4, 3, padding=1)
        self.blow_up = nn.Conv2d(4, 4, 1)
        nn.init.constant_(self.blow_up.weight, 3e4)
        nn.init.zeros_(self.blow_up.bias)
        self.last = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x, t):
        return self.last(self.blow_up(self.first(x) + 1.0))


def overflow(**_):
    return Overflow()
