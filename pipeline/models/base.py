"""The adapter interface every model kind implements, and block resolution.

An adapter wraps a denoiser ``nn.Module`` and knows: its noise schedule
(``alphas_cumprod``), its input preprocessing, how to call it with (x_t, t, cond),
which submodules are capturable blocks, and (for latent models) how to encode
pixels. Blocks are discovered by one dry forward with hooks on every candidate
module: a candidate is a top-level child, or a child of a ``ModuleList`` /
``Sequential``, whose output is a ``(B, C, H, W)`` map (or ``(B, N, D)`` tokens that
the adapter reshapes to a grid, for DiT). The dry forward runs on the ``meta`` device
(parameters swapped for meta tensors with ``torch.func.functional_call``), so only
shapes are computed; a model whose forward cannot run on meta tensors gets a real
forward at batch 1 instead.

Stages call the model through :meth:`ModelAdapter.run`, which feeds x_t in the dtype
the model's precision wants (``pipeline.models.precision``) and turns a RuntimeError
raised inside the model's code into a one-line ``ModelError`` naming the model, the
dtype and the setting to change.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.datasets.preprocess import Preprocessing
from pipeline.errors import ModelError, did_you_mean, list_choices
from pipeline.hooks import capture, run_truncated
from pipeline.models.precision import FLOAT32, Precision, cast_like_diffusers
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
        self.precision: Precision = FLOAT32
        self.discovery: str | None = None  # how blocks() found the shapes: "meta" or "forward"
        self._pinned_device: torch.device | None = None
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

    def set_compute_dtype(self, dtype: torch.dtype) -> Precision:
        """Put ``module`` in ``dtype`` the way the model's own code expects; diffusers' rule by default."""
        return cast_like_diffusers(self.module, dtype)

    # ---- shared ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        # during the meta dry forward the parameters are meta tensors; the model still lives here
        return getattr(self, "_pinned_device", None) or next(self.module.parameters()).device

    @property
    def label(self) -> str:
        """How messages name the model: its kind and where it came from."""
        where = self.source.get("factory") or self.source.get("path") or self.source.get("config")
        return f"{self.kind} model {str(where)!r}" if where else f"{self.kind} model"

    def run(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """``forward`` as the stages call it: x_t cast to the precision's input dtype, the
        forward under the precision's context, and a RuntimeError from model code turned
        into a one-line ModelError (a capture hook's stop signal passes through)."""
        x_t = x_t.to(self.precision.input_dtype)
        try:
            with self.precision.context(x_t.device):
                return self.forward(x_t, t, cond)
        except RuntimeError as exc:
            raise ModelError(self.failure_message(exc, tuple(x_t.shape))) from exc

    def failure_message(self, exc: BaseException, input_shape: tuple[int, ...]) -> str:
        """One line: which model failed, in which dtype, on what input, and what to change."""
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        dtype = str(self.precision.dtype).removeprefix("torch.")
        where = f"{self.label} failed in {dtype} on input {input_shape}: {first}"
        if isinstance(exc, torch.OutOfMemoryError):
            return f"{where}; lower batch_size"
        if self.precision.dtype != torch.float32:
            return (f"{where}; set compute_dtype: float32, or make the model's forward run in {dtype} "
                    f"(diffprobe used: {self.precision.method})")
        return (f"{where}; check the input size and channels the model takes "
                "(model.size / --size, options.image_size and options.in_channels for a factory)")

    def provenance(self) -> dict:
        return {
            "kind": self.kind,
            "source": self.source,
            "weights_sha256": weights_hash(self.module),
            "num_train_timesteps": self.num_train_timesteps,
            "scheduler": self.scheduler_config,
            "num_classes": self.num_classes,
            "null_class": self.null_class,
            "precision": self.precision.to_attrs(),
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
        """Every capturable block in forward order, with its (C, H, W) output shape (cached)."""
        if self._blocks is None:
            self._blocks = self.find_blocks()
        return self._blocks

    def find_blocks(self, meta: bool = True) -> list[BlockInfo]:
        """Discover the blocks: on the meta device where the forward allows it (``meta``), else
        by a real batch-1 forward. ``self.discovery`` says which one ran."""
        candidates = self._candidates()
        found = None
        if meta:
            try:
                found = self._dry_forward(candidates, meta=True)
                self.discovery = "meta"
            except Exception:  # noqa: BLE001 -- an op without a meta kernel, data-dependent flow: run it for real
                found = None
        if found is None:
            found = self._dry_forward(candidates, meta=False)
            self.discovery = "forward"
        order, got = found
        shapes: dict[str, tuple[int, ...]] = {}
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
        return seen

    def forward_flops(self, stop_after: str) -> float:
        """FLOPs of one sample's forward up to block ``stop_after``, as torch's ``FlopCounterMode``
        counts them (convolutions, matmuls, attention), for ``diffprobe plan``'s GPU projection:
        on the meta device where the forward allows it (nothing computed), else one real forward."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        try:
            with counter:
                self._dry_forward([stop_after], meta=True, stop_after=stop_after)
        except Exception:  # noqa: BLE001 -- an op without a meta kernel, data-dependent flow: run it
            counter = FlopCounterMode(display=False)
            with counter:
                self._dry_forward([stop_after], meta=False, stop_after=stop_after)
        return float(counter.get_total_flops())

    def _dry_forward(self, candidates: list[str], meta: bool,
                     stop_after: str | None = None) -> tuple[list[str], dict[str, torch.Tensor]]:
        """One batch-1 forward with hooks on ``candidates`` (cut after ``stop_after``):
        (names in call order, outputs)."""
        from torch.func import functional_call

        order: list[str] = []

        def record(name, tensor):
            order.append(name)
            return tensor

        device = torch.device("meta") if meta else self.device
        x = torch.zeros(1, self.latent_channels, self.latent_size, self.latent_size, device=device,
                        dtype=self.precision.input_dtype)
        t = torch.zeros(1, dtype=torch.long, device=device)
        cond = self.dry_condition(1, device)
        with torch.no_grad(), capture(self.module, candidates, stop_after=stop_after, transform=record) as got:
            if meta:
                tensors = {f"net.{name}": torch.empty_like(value, device="meta") for name, value in
                           [*self.module.named_parameters(), *self.module.named_buffers()]}
                self._pinned_device = self.device
                try:
                    run_truncated(lambda: functional_call(_AdapterForward(self), tensors, (x, t, cond)))
                finally:
                    self._pinned_device = None
            else:
                run_truncated(lambda: self.run(x, t, cond))
        return order, got

    def dry_condition(self, batch: int, device: torch.device | None = None) -> Condition:
        if self.label_conditional:
            return Condition("label", labels=torch.zeros(batch, dtype=torch.long, device=device or self.device))
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
            if key.isdigit() and not paper:
                top = [n for n in by_name if n.count(".") <= 1] or list(by_name)
                raise ModelError(
                    f"block {key}: numbers are the paper's block numbering, which exists for guided-diffusion "
                    f"layouts (input_blocks / middle_block / output_blocks); this {self.kind} model has none: "
                    f"name blocks by module path, e.g. {list_choices(top, limit=8)}; see `diffprobe blocks MODEL`"
                )
            if key.isdigit():
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


class _AdapterForward(nn.Module):
    """``adapter.forward`` as a module whose only child is the network (``net``), so
    ``functional_call`` can swap the network's tensors while the adapter's own code runs."""

    def __init__(self, adapter: ModelAdapter):
        super().__init__()
        self.net = adapter.module
        self._call = adapter.forward

    def forward(self, x_t, t, cond):
        return self._call(x_t, t, cond)
