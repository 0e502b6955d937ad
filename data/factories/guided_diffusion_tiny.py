"""A tiny network in OpenAI guided-diffusion's layout, for tests and as a plug-in example.

It mirrors ``guided_diffusion.unet.UNetModel``'s module structure
(``input_blocks`` of ``TimestepEmbedSequential``, ``middle_block``, ``output_blocks``,
resblocks with up/down, skip connections) at toy width, so the paper's 1-based block
numbers resolve exactly as for ADM-256: with ``channel_mult=(1, 1, 2, 2, 4, 4)`` and
``num_res_blocks=2`` there are 18 input blocks, the middle block (19) and 18 output
blocks (20-37).

To plug in the real checkpoint, write a factory like::

    def adm256(checkpoint):
        from guided_diffusion.script_util import create_model
        model = create_model(image_size=256, num_channels=256, num_res_blocks=2,
                             channel_mult="", learn_sigma=True, class_cond=False,
                             attention_resolutions="32,16,8", num_head_channels=64,
                             resblock_updown=True, use_fp16=False, use_scale_shift_norm=True)
        model.load_state_dict(torch.load(checkpoint, map_location="cpu"))
        return model

and set ``model: {kind: factory, factory: my_factories.py:adm256, options: {checkpoint: ...,
image_size: 256, in_channels: 3}}``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, ch, emb_ch, out_ch=None, up=False, down=False):
        super().__init__()
        out_ch = out_ch or ch
        self.in_layers = nn.Sequential(nn.GroupNorm(4, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(4, out_ch), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)
        self.resample = (lambda x: nn.functional.interpolate(x, scale_factor=2)) if up else (
            (lambda x: nn.functional.avg_pool2d(x, 2)) if down else (lambda x: x))

    def forward(self, x, emb):
        x = self.resample(x)
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class TinyGuidedUNet(nn.Module):
    def __init__(self, image_size=32, in_channels=3, model_channels=8, channel_mult=(1, 1, 2, 2, 4, 4),
                 num_res_blocks=2, learn_sigma=True, num_classes=None):
        super().__init__()
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        emb = model_channels * 4
        self.model_channels = model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        if num_classes:
            self.label_emb = nn.Embedding(num_classes, emb)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        chans, ch = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.input_blocks.append(TimestepEmbedSequential(ResBlock(ch, emb, mult * model_channels)))
                ch = mult * model_channels
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(ResBlock(ch, emb, down=True)))
                chans.append(ch)
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb), ResBlock(ch, emb))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, model_channels * mult)]
                ch = model_channels * mult
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb, up=True))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        out_ch = in_channels * (2 if learn_sigma else 1)
        self.out = nn.Sequential(nn.GroupNorm(4, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))

    def forward(self, x, timesteps, y=None):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes and y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def tiny_adm(image_size: int = 32, in_channels: int = 3, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Factory entry point: ``data/factories/guided_diffusion_tiny.py:tiny_adm``."""
    return TinyGuidedUNet(image_size=image_size, in_channels=in_channels, num_classes=num_classes, **kwargs)
