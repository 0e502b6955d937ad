"""Adapter for any ``nn.Module`` built by a user's ``module:function`` factory.

This is how an original guided-diffusion (ADM) checkpoint is plugged in: a function
that builds the network with the repo's own ``create_model`` and loads the local
``.pt`` file. The function receives ``options`` as keyword arguments and returns
either a ready ``ModelAdapter`` or an ``nn.Module`` called as ``module(x_t, t)`` /
``module(x_t, t, y=labels)`` (guided-diffusion's signature). A learned-sigma output
(2x the input channels) is split and the eps half kept. A network without a timestep
(a reference CNN for CKA) sets ``timestep_free: true``; it is called as ``module(x)``.

Options: the adapter-only options :data:`ADAPTER_OPTIONS` are not passed to the
function; :data:`SHARED_OPTIONS` (the model's input and classes) are read by the
adapter and passed when the function takes them; every other option must be a
parameter of the function (one with ``**kwargs`` takes anything). An option the
function does not take is an error naming the accepted ones, never dropped.

Precision (``compute_dtype``): a module in guided-diffusion's convention is converted
with its own ``convert_to_fp16``; any other module keeps float32 parameters and runs
under ``torch.autocast`` (see ``pipeline.models.precision``).

For models in guided-diffusion's layout (``input_blocks`` / ``middle_block`` /
``output_blocks``) the paper's 1-based block numbers are accepted: 1..len(input_blocks)
are the input blocks, the next number the middle block, then the output blocks
(ADM-256: 1-18, 19, 20-37; block 24 = output_blocks.4).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import torch
from torch import nn

from pipeline.datasets.preprocess import Preprocessing
from pipeline.errors import DiffprobeError, ModelError, did_you_mean
from pipeline.models.base import Condition, ModelAdapter
from pipeline.models.config import ModelConfig
from pipeline.models.precision import (
    Precision,
    autocast_precision,
    guided_diffusion_precision,
    is_guided_diffusion,
)
from pipeline.models.schedule import alphas_cumprod, load_scheduler_config

#: Options the adapter reads and the factory function does not receive.
ADAPTER_OPTIONS = ("timestep_free", "value_range")
#: Options the adapter reads that are also passed to a function taking them.
SHARED_OPTIONS = ("image_size", "in_channels", "num_classes")


def resolve_callable(spec: str):
    """``pkg.module:function`` or ``path/to/file.py:function`` -> the function."""
    if ":" not in spec:
        raise ModelError(f"factory {spec!r} must look like 'package.module:function' or 'file.py:function'")
    target, func_name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.exists():
            raise ModelError(f"factory file {str(path)!r} does not exist")
        name = f"diffprobe_factory_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # so pickling / dataclasses inside it work
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ModelError(f"cannot import factory module {target!r}: {exc}") from None
    if not hasattr(module, func_name):
        raise ModelError(f"factory module {target!r} has no function {func_name!r}")
    return getattr(module, func_name)


def paper_numbering(module: nn.Module) -> dict[int, str] | None:
    """guided-diffusion layout -> {1: 'input_blocks.0', ..., n+1: 'middle_block', ...}."""
    if not all(hasattr(module, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        return None
    numbers: dict[int, str] = {}
    for i in range(len(module.input_blocks)):
        numbers[len(numbers) + 1] = f"input_blocks.{i}"
    numbers[len(numbers) + 1] = "middle_block"
    for i in range(len(module.output_blocks)):
        numbers[len(numbers) + 1] = f"output_blocks.{i}"
    return numbers


class FactoryAdapter(ModelAdapter):
    kind = "factory"

    def __init__(self, cfg: ModelConfig, module: nn.Module):
        super().__init__()
        opts = dict(cfg.options)
        self.module = module.eval().requires_grad_(False)
        self.timestep_free = bool(opts.get("timestep_free", False))
        size = cfg.size or opts.get("image_size") or getattr(module, "image_size", None)
        channels = opts.get("in_channels") or getattr(module, "in_channels", None)
        if not size or not channels:
            raise ModelError(
                f"factory {cfg.factory!r}: set options.image_size and options.in_channels (the model's input)"
            )
        self.latent_size, self.latent_channels = int(size), int(channels)
        value_range = tuple(opts.get("value_range", (-1.0, 1.0)))
        self.preprocessing = Preprocessing(size=int(size), channels=int(channels), value_range=value_range)
        num_classes = opts.get("num_classes") or getattr(module, "num_classes", None)
        self.num_classes = int(num_classes) if num_classes else None
        self.null_class = cfg.null_class
        if cfg.null_class is not None:
            if not self.num_classes:
                raise ModelError(f"factory {cfg.factory!r}: null_class is set but the model has no classes "
                                 "(no num_classes); drop model.null_class")
            if not 0 <= cfg.null_class < self.num_classes:
                raise ModelError(
                    f"null_class {cfg.null_class} is outside factory {cfg.factory!r}'s {self.num_classes} class "
                    f"labels (valid: 0-{self.num_classes - 1}); set model.null_class to the index of the "
                    "null (unconditional) label, or drop it"
                )
        self.scheduler_config = {} if self.timestep_free else load_scheduler_config(None, cfg.scheduler)
        self.num_train_timesteps = 1 if self.timestep_free else int(self.scheduler_config["num_train_timesteps"])
        self.alphas_cumprod = (
            torch.ones(1, dtype=torch.float64) if self.timestep_free else alphas_cumprod(self.scheduler_config)
        )
        self.source = {"factory": cfg.factory, "options": opts}
        self.takes_timestep = not self.timestep_free
        self._forward_takes_y = "y" in inspect.signature(module.forward).parameters

    @property
    def label_conditional(self) -> bool:
        return bool(self.num_classes) and self._forward_takes_y and self.takes_timestep

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        if self.timestep_free:
            return self.module(x_t)
        kwargs = {}
        if cond.kind in ("class", "label", "null"):
            if not self._forward_takes_y:
                raise ModelError("this factory model's forward takes no 'y': use conditioning 'none'")
            labels = cond.labels
            if cond.kind == "null":
                if self.null_class is None:
                    raise ModelError("conditioning 'null' needs model.null_class")
                labels = torch.full((x_t.shape[0],), self.null_class, dtype=torch.long)
            kwargs["y"] = labels.to(x_t.device)
        out = self.module(x_t, t, **kwargs)
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[1] == 2 * x_t.shape[1]:
            out = out[:, : x_t.shape[1]]  # learned sigma: keep the eps half
        return out

    def paper_block_names(self) -> dict[int, str] | None:
        return paper_numbering(self.module)

    def set_compute_dtype(self, dtype: torch.dtype) -> Precision:
        """guided-diffusion's own fp16 conversion where the module has it, else autocast."""
        if is_guided_diffusion(self.module):
            return guided_diffusion_precision(self.module, dtype)
        return autocast_precision(dtype)


def factory_kwargs(fn, spec: str, options: dict) -> dict:
    """The options ``fn`` receives; an option it does not take is a ModelError naming the accepted ones."""
    kwargs = {k: v for k, v in options.items() if k not in ADAPTER_OPTIONS}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check against
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in kwargs if k not in accepted and k not in SHARED_OPTIONS]
    if unknown:
        adapter_own = [o for o in ADAPTER_OPTIONS + SHARED_OPTIONS if o not in accepted]
        raise ModelError(
            f"factory {spec!r} takes no option {unknown[0]!r}{did_you_mean(unknown[0], accepted)}; accepted: "
            f"{', '.join(accepted) or '(none)'} (the function's), {', '.join(adapter_own)} (the adapter's)"
        )
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        raise ModelError(f"factory {spec!r} needs option(s) {', '.join(missing)}: set them under model.options")
    return kwargs


def build_factory_adapter(cfg: ModelConfig) -> ModelAdapter:
    if not cfg.factory:
        raise ModelError("model kind 'factory' needs 'factory: package.module:function'")
    fn = resolve_callable(cfg.factory)
    kwargs = factory_kwargs(fn, cfg.factory, cfg.options)
    torch.manual_seed(cfg.seed)
    try:
        obj = fn(**kwargs)
    except DiffprobeError:
        raise
    except Exception as exc:  # the user's code: one line here, -v shows the traceback
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ModelError(f"factory {cfg.factory!r} failed with options {sorted(kwargs)}: "
                         f"{type(exc).__name__}: {first}") from exc
    if isinstance(obj, ModelAdapter):
        return obj
    if not isinstance(obj, nn.Module):
        raise ModelError(f"factory {cfg.factory!r} returned {type(obj).__name__}; expected an nn.Module or ModelAdapter")
    return FactoryAdapter(cfg, obj)
