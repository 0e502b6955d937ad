"""Context-managed activation capture with an optional truncated forward.

``capture(model, names, stop_after=name)`` registers forward hooks on the named
submodules, collects their outputs, and, when ``stop_after`` is given, raises a
private ``StopForward`` from that block's hook so the rest of the network never runs.
Adapters call the model inside ``run_truncated`` which swallows exactly that signal.
Hooks are removed on exit, also when the forward raised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook to end a forward early; never escapes ``run_truncated``."""


def first_tensor(output) -> torch.Tensor:
    """The feature tensor of a module output (diffusers blocks return tuples / dataclasses)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"module output of type {type(output).__name__} holds no tensor")


@contextlib.contextmanager
def capture(
    model: nn.Module,
    names: Sequence[str],
    stop_after: str | None = None,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Capture outputs of ``names`` (dotted module paths) into the yielded dict.

    ``transform(name, tensor)`` runs inside the hook (e.g. pooling, token reshaping),
    so only what is needed stays alive.
    """
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            tensor = first_tensor(output).detach()
            captured[name] = transform(name, tensor) if transform else tensor
            if name == stop_after:
                raise StopForward

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def run_truncated(fn: Callable[[], object]) -> object | None:
    """Call ``fn`` (a model forward); return None if a capture hook stopped it early."""
    try:
        return fn()
    except StopForward:
        return None
