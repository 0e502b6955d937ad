"""A tiny network in OpenAI guided-diffusion's layout, for tests and as a plug-in example.

It mirrors ``guided_diffusion.unet.UNetModel``'s module structure
(``input_blocks`` of ``TimestepEmbedSequential``, ``middle_block``, ``output_blocks``,
resblocks with up/down, skip connections) at toy width, so the paper's 1-based block
numbers resolve exactly as for ADM-256: with ``channel_mult=(1, 1, 2, 2, 4, 4)`` and
``num_res_blocks=2`` there are 18 input blocks, the middle block (19) and 18 output
blocks (20-37).

It also follows the reference's precision convention, so diffprobe's handling of
``compute_dtype`` is tested against the same contract a real checkpoint has: the
sinusoidal timestep embedding is float32, ``convert_to_fp16()`` converts only the
convolutions of ``input_blocks`` / ``middle_block`` / ``output_blocks``, the norms
compute in float32 and cast back (``GroupNorm32``), each resblock casts its embedding
projection to the feature dtype, attention takes its softmax in float32, and the
forward casts h to ``self.dtype`` before the body and back to x's dtype before ``out``.

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
    """(B,) timesteps -> (B, dim) float32 sinusoids, whatever the model's dtype (as the reference)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """Normalises in float32 and returns the input's dtype."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def convert_convs_to_f16(layer: nn.Module) -> None:
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        layer.weight.data = layer.weight.data.half()
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.half()


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class AttentionBlock(nn.Module):
    """Self-attention over positions, heads split before q/k/v (the reference's legacy order)."""

    def __init__(self, ch, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = GroupNorm32(4, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat)).reshape(b * self.heads, 3 * c // self.heads, -1)
        q, k, v = qkv.split(c // self.heads, dim=1)
        scale = (c // self.heads) ** -0.25  # on q and k each: 1/sqrt(d) overall, and fp16-safe
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        h = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
        return (flat + self.proj_out(h)).reshape(b, c, *spatial)


class ResBlock(nn.Module):
    def __init__(self, ch, emb_ch, out_ch=None, up=False, down=False):
        super().__init__()
        out_ch = out_ch or ch
        self.in_layers = nn.Sequential(GroupNorm32(4, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(GroupNorm32(4, out_ch), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)
        self.resample = (lambda x: nn.functional.interpolate(x, scale_factor=2)) if up else (
            (lambda x: nn.functional.avg_pool2d(x, 2)) if down else (lambda x: x))

    def forward(self, x, emb):
        x = self.resample(x)
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class TinyGuidedUNet(nn.Module):
    def __init__(self, image_size=32, in_channels=3, model_channels=8, channel_mult=(1, 1, 2, 2, 4, 4),
                 num_res_blocks=2, learn_sigma=True, num_classes=None, use_fp16=False):
        super().__init__()
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.dtype = torch.float16 if use_fp16 else torch.float32
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
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb), AttentionBlock(ch), ResBlock(ch, emb))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, model_channels * mult)]
                ch = model_channels * mult
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb, up=True))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        out_ch = in_channels * (2 if learn_sigma else 1)
        self.out = nn.Sequential(GroupNorm32(4, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))

    def convert_to_fp16(self):
        """Convert the torso (the convolutions of the three block lists) to float16."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            blocks.apply(convert_convs_to_f16)

    def forward(self, x, timesteps, y=None):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes and y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x.type(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def tiny_adm(image_size: int = 32, in_channels: int = 3, num_classes: int | None = None, model_channels: int = 8,
             channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4), num_res_blocks: int = 2,
             learn_sigma: bool = True) -> nn.Module:
    """Factory entry point: ``data/factories/guided_diffusion_tiny.py:tiny_adm``.

    The model is built in float32; ``compute_dtype: float16`` converts it with its own
    ``convert_to_fp16`` (as guided-diffusion's scripts do after ``create_model``).
    """
    return TinyGuidedUNet(image_size=image_size, in_channels=in_channels, model_channels=model_channels,
                          channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                          learn_sigma=learn_sigma, num_classes=num_classes)
