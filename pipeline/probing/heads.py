"""The four probe heads of Mukhopadhyay et al.: linear, MLP, CNN and attention.

Every head maps a batch of pooled feature maps ``x: (B, C, p, p) float32`` to class
logits ``(B, num_classes)``. A head is described by a frozen :class:`HeadSpec` and
built with :func:`build_head` once the feature shape ``(C, p, p)`` is known.

What the spec fields mean per kind:

============  ==============================================================
kind          fields used
============  ==============================================================
linear        dropout (on the input)
mlp           hidden (width), depth (hidden layers), dropout
cnn           hidden (conv channels), depth (conv blocks), dropout
attention     width, depth (encoder layers), heads, mlp_ratio, dropout
============  ==============================================================

The paper's reference heads: ``HeadSpec("linear")`` on block 24 pooled to 2x2, and
``HeadSpec("attention")`` on block 24 pooled to 16x16 (a CLS-token transformer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import ConfigError, did_you_mean

HEAD_KINDS = ("linear", "mlp", "cnn", "attention")


@dataclass(frozen=True)
class HeadSpec:
    """Architecture of one probe head; validated on construction.

    Parameters
    ----------
    kind : {"linear", "mlp", "cnn", "attention"}
    hidden : int
        MLP hidden width; CNN conv channels.
    depth : int
        MLP hidden layers; CNN conv blocks; attention encoder layers (>= 1).
    heads : int
        Attention heads; ``width`` must be a multiple of it.
    width : int
        Attention token width (the input channels are projected to it).
    mlp_ratio : float
        Attention feed-forward width as a multiple of ``width``.
    dropout : float
        In [0, 1).
    """

    kind: str = "linear"
    hidden: int = 512
    depth: int = 1
    heads: int = 4
    width: int = 256
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ConfigError(
                f"unknown head kind {self.kind!r}{did_you_mean(self.kind, HEAD_KINDS)}; "
                f"valid: {', '.join(HEAD_KINDS)}"
            )
        for name in ("hidden", "depth", "heads", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"head {name} must be an integer >= 1; got {value!r}")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"head mlp_ratio must be > 0; got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head dropout must be in [0, 1); got {self.dropout!r}")
        if self.kind == "attention" and self.width % self.heads:
            raise ConfigError(
                f"attention head width {self.width} is not a multiple of heads {self.heads}; "
                f"use e.g. width={self.heads * math.ceil(self.width / self.heads)}"
            )


class LinearHead(nn.Module):
    """Flatten ``(B, C, p, p)`` and apply one linear layer."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(math.prod(in_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x.flatten(1)))


class MLPHead(nn.Module):
    """Flatten, then ``depth`` x (Linear -> ReLU -> Dropout), then a linear classifier."""

    def __init__(self, in_shape, num_classes: int, hidden: int, depth: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = math.prod(in_shape)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x.flatten(1)))


class CNNHead(nn.Module):
    """``depth`` x (conv3x3 -> GroupNorm -> ReLU) on the C x p x p map, global average, linear.

    GroupNorm rather than BatchNorm: a last minibatch of one sample must train too,
    and statistics must not depend on batch composition. Padding 1 keeps p x p, so
    p = 1 works (the conv reduces to its centre tap).
    """

    def __init__(self, in_shape, num_classes: int, hidden: int, depth: int, dropout: float = 0.0):
        super().__init__()
        channels = in_shape[0]
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=1, bias=False),
                nn.GroupNorm(math.gcd(hidden, 8), hidden),
                nn.ReLU(),
            ]
            channels = hidden
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.body(x).mean(dim=(2, 3))))


class AttentionHead(nn.Module):
    """CLS-token transformer over the p*p spatial tokens (the paper's best head).

    Each spatial position is a token of C channels, projected to ``width``; learned
    positional embeddings are added, a learned CLS token is prepended, ``depth``
    pre-norm encoder layers run, and the class is read from the CLS token.
    """

    def __init__(
        self,
        in_shape,
        num_classes: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        channels, h, w = in_shape
        self.proj = nn.Linear(channels, width)
        self.pos = nn.Parameter(torch.zeros(1, h * w, width))
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=heads,
            dim_feedforward=max(1, round(width * mlp_ratio)),
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # Nested tensors only help with padding masks, which tokens of a map never have.
        self.encoder = nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x.flatten(2).transpose(1, 2)) + self.pos  # (B, p*p, width)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)
        return self.fc(self.norm(self.encoder(tokens)[:, 0]))


def build_head(spec: HeadSpec, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the head described by ``spec`` for features of ``in_shape = (C, p, p)``.

    Parameters
    ----------
    spec : HeadSpec
    in_shape : (C, H, W)
        One sample's feature shape (the batch axis excluded).
    num_classes : int
        Number of output logits (>= 2).

    Returns
    -------
    torch.nn.Module mapping ``(B, C, H, W) float32`` to ``(B, num_classes)`` logits,
    initialised from torch's global RNG (seed it first for reproducible weights).
    """
    if not isinstance(spec, HeadSpec):
        raise ConfigError(f"expected a HeadSpec, got {type(spec).__name__}")
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ConfigError(
            f"head input shape must be (channels, y, x) with every size >= 1; got {in_shape}"
        )
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ConfigError(f"a classifier head needs num_classes >= 2; got {num_classes!r}")
    num_classes = int(num_classes)
    if spec.kind == "linear":
        return LinearHead(in_shape, num_classes, spec.dropout)
    if spec.kind == "mlp":
        return MLPHead(in_shape, num_classes, spec.hidden, spec.depth, spec.dropout)
    if spec.kind == "cnn":
        return CNNHead(in_shape, num_classes, spec.hidden, spec.depth, spec.dropout)
    return AttentionHead(
        in_shape, num_classes, spec.width, spec.depth, spec.heads, spec.mlp_ratio, spec.dropout
    )


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
