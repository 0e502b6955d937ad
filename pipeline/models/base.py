"""The adapter interface every model kind implements, and block resolution.

An adapter wraps a denoiser ``nn.Module`` and knows: its noise schedule
(``alphas_cumprod``), its input preprocessing, how to call it with (x_t, t, cond),
which submodules are capturable blocks, and (for latent models) how to encode
pixels. Blocks are discovered by one dry forward with hooks on every candidate
module: a candidate is a top-level child, or a child of a ``ModuleList`` /
``Sequential``, whose output is a ``(B, C, H, W)`` map (or ``(B, N, D)`` tokens that
the adapter reshapes to a grid, for DiT).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.datasets.preprocess import Preprocessing
from pipeline.errors import ModelError, did_you_mean, list_choices
from pipeline.hooks import capture, run_truncated
from pipeline.noise import q_sample


@dataclass(frozen=True)
class BlockInfo:
    """A capturable block: dotted module path, forward position (0-based), (C, H, W) per sample."""

    name: str
    position: int
    shape: tuple[int, int, int]
    paper_number: int | None = None


@dataclass(frozen=True)
class Condition:
    """What the model is conditioned on for one batch.

    kind: ``none`` | ``class`` (the image's label) | ``null`` (the null class) |
        ``label`` (explicit labels, used by the Diffusion Classifier) | ``text``.
    labels: (B,) int64 class indices for ``class``/``label``.
    text: (B, L, D) prompt embeddings for ``text``.
    """

    kind: str = "none"
    labels: torch.Tensor | None = None
    text: torch.Tensor | None = field(default=None, repr=False)


def component_folder(folder: Path, component: str, what: str) -> Path:
    """``folder/<component>`` of a pipeline folder, or ``folder`` itself if it is a model folder."""
    if (folder / component / "config.json").exists():
        return folder / component
    if (folder / "config.json").exists():
        return folder
    raise ModelError(
        f"no {what} in {str(folder)!r}: expected {component}/config.json (pipeline folder) "
        "or config.json (model folder)"
    )


def weights_hash(module: nn.Module) -> str:
    """sha256 over parameter names, shapes and bytes: identifies the weights stored."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes() if tensor.dtype != torch.bfloat16
                 else tensor.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


class ModelAdapter:
    """Base class. Subclasses set the attributes in ``__init__`` and implement ``forward``.

    What an adapter can do is declared, not guessed by the stages:

    - ``takes_timestep``: False for timestep-free reference networks (a classifier CNN
      whose ``forward(x)`` ignores t); such a model has one "timestep".
    - ``label_conditional``: the model takes class labels (``Condition("class" |
      "label" | "null")``).
    - ``text_conditional``: the model takes prompt embeddings from ``encode_text``.
    """

    kind: str = "base"
    takes_timestep: bool = True
    text_conditional: bool = False

    def __init__(self) -> None:
        self.module: nn.Module
        self.num_train_timesteps: int = 1000
        self.alphas_cumprod: torch.Tensor  # (T,) float64
        self.preprocessing: Preprocessing
        self.latent_channels: int  # channels of x_0 in model space
        self.latent_size: int  # spatial size of x_0 in model space
        self.num_classes: int | None = None
        self.null_class: int | None = None
        self.scheduler_config: dict = {}
        self.source: dict = {}
        self._blocks: list[BlockInfo] | None = None

    # ---- what subclasses implement -------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Predict eps for x_t (B, C, H, W) at integer timesteps t (B,)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, H, W) in the preprocessing range -> model-space x_0. Identity for pixel models."""
        return x

    def feature_map(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Turn a captured output into (B, C, H, W). Token models override."""
        return tensor

    def paper_block_names(self) -> dict[int, str] | None:
        """1-based paper numbering -> module path, where the model has one (guided-diffusion)."""
        return None

    @property
    def label_conditional(self) -> bool:
        """Whether the model takes class labels; adapters whose forward cannot take them override."""
        return bool(self.num_classes)

    def encode_text(self, prompts) -> torch.Tensor:
        """Prompts -> (K, L, D) embeddings; only text-conditional adapters implement it."""
        raise ModelError(f"this {self.kind} model is not text-conditional: it takes no prompts")

    # ---- shared ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def provenance(self) -> dict:
        return {
            "kind": self.kind,
            "source": self.source,
            "weights_sha256": weights_hash(self.module),
            "num_train_timesteps": self.num_train_timesteps,
            "scheduler": self.scheduler_config,
            "num_classes": self.num_classes,
            "null_class": self.null_class,
        }

    def _candidates(self) -> list[str]:
        # Top-level children, children of any ModuleList (diffusers' down_blocks.i,
        # down_blocks.i.resnets.j), and children of a Sequential that is itself a
        # candidate (guided-diffusion's input_blocks.i.0) -- not every conv and norm.
        names: list[str] = []
        for parent_name, parent in self.module.named_modules():
            for child_name, _child in parent.named_children():
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                if (
                    parent_name == ""
                    or isinstance(parent, nn.ModuleList)
                    or (isinstance(parent, nn.Sequential) and parent_name in names)
                ):
                    names.append(full)
        return names

    def blocks(self) -> list[BlockInfo]:
        """Every capturable block in forward order, with its (C, H, W) output shape."""
        if self._blocks is not None:
            return self._blocks
        candidates = self._candidates()
        order: list[str] = []

        def record(name, tensor):
            order.append(name)
            return tensor

        device = self.device
        x = torch.zeros(1, self.latent_channels, self.latent_size, self.latent_size, device=device,
                        dtype=next(self.module.parameters()).dtype)
        t = torch.zeros(1, dtype=torch.long, device=device)
        cond = self.dry_condition(1)
        shapes: dict[str, tuple[int, ...]] = {}
        with torch.no_grad(), capture(self.module, candidates, transform=record) as got:
            run_truncated(lambda: self.forward(x, t, cond))
        for name in order:
            try:
                fmap = self.feature_map(name, got[name])
            except (TypeError, ValueError):
                continue
            if fmap.dim() == 4:
                shapes[name] = tuple(fmap.shape[1:])
        paper = {v: k for k, v in (self.paper_block_names() or {}).items()}
        seen: list[BlockInfo] = []
        for name in dict.fromkeys(order):  # a module called twice keeps its first position
            if name in shapes:
                seen.append(BlockInfo(name, len(seen), shapes[name], paper.get(name)))
        self._blocks = seen
        return seen

    def dry_condition(self, batch: int) -> Condition:
        if self.label_conditional:
            return Condition("label", labels=torch.zeros(batch, dtype=torch.long, device=self.device))
        return Condition("none")

    def resolve_blocks(self, requested) -> list[BlockInfo]:
        """Names, paper numbers (guided-diffusion layout) or ``'all'`` -> BlockInfo in forward order."""
        available = self.blocks()
        by_name = {b.name: b for b in available}
        if requested == "all" or requested == ["all"]:
            return list(available)
        if isinstance(requested, (str, int)):
            requested = [requested]
        paper = self.paper_block_names() or {}
        chosen = []
        for item in requested:
            key = str(item)
            if key.isdigit() and paper:
                number = int(key)
                if number not in paper:
                    raise ModelError(f"paper block number {number} out of range; valid: 1-{max(paper)}")
                key = paper[number]
            if key not in by_name:
                hint = did_you_mean(key, by_name)
                raise ModelError(
                    f"unknown block {key!r}{hint}; valid: {list_choices(by_name)}; see `diffprobe blocks MODEL`"
                )
            chosen.append(by_name[key])
        return sorted(dict.fromkeys(chosen), key=lambda b: b.position)

    def check_timesteps(self, timesteps) -> list[int]:
        out = []
        for t in timesteps:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.num_train_timesteps:
                raise ModelError(
                    f"timestep {t!r} outside the scheduler's range; use integers 0..{self.num_train_timesteps - 1}"
                )
            out.append(int(t))
        if len(set(out)) != len(out):
            raise ModelError(f"timesteps {out} contain duplicates; list each timestep once")
        return out

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) with this model's schedule (see ``pipeline.noise.q_sample``)."""
        return q_sample(x0, eps, self.alphas_cumprod, t)
