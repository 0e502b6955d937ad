"""diffusers' model classes, imported without everything that sits beside them.

``from diffusers.models.unets.unet_2d import UNet2DModel`` executes the package
``diffusers.models.unets`` first, whose ``__init__`` imports every U-Net diffusers
ships; through them ``diffusers.models.transformers`` and its 70-odd transformers,
their LoRA and single-file loaders, Hugging Face ``transformers``' loss modules and
``scipy.stats``; and ``diffusers.utils`` imports ``torch._dynamo`` (the compiler front
end, with sympy) for one decorator. That import alone cost 4.0 CPU-s in a fresh
process after torch; building the digits model (weights and block discovery) took
4.0-4.7 CPU-s in all, 3.1-3.4 through this module, in every ``diffprobe run``,
``plan`` and ``blocks`` that builds one (benchmarks/RESULTS.md, "Fixed cost of a run").
A run still imports ``torch._dynamo`` later: ``from_pretrained`` asks ``model.device``,
which imports ``diffusers.hooks`` (decorated with ``@torch.compiler.disable``), and
block discovery on the meta device runs torch's Python reference ops, which torch
wraps with its own ``_disable_dynamo``.

:func:`diffusers_module` imports one module with two changes, both undone before
it returns:

- the eager subpackages of ``diffusers.models`` not imported yet stand in
  sys.modules as packages whose ``__init__`` has not run, so a module's own
  imports (``..transformers.transformer_2d``) load only what they name. Afterwards
  the stand-ins are removed: a later ``import diffusers.models.unets`` (or
  ``from diffusers import UNet2DConditionModel``) runs the real ``__init__``, which
  finds the modules already loaded and reuses them, so every class keeps one
  identity;
- ``torch._dynamo`` cannot be imported, so ``diffusers.utils.torch_utils`` takes its
  own fallback for ``maybe_allow_in_graph`` (the identity), as it does where torch has
  no dynamo. ``allow_in_graph`` on a class only marks *calls of the class* (building
  an instance) inside compiled code as graph nodes; the forward of a module is
  traced the same either way, and ``torch.compile`` imports dynamo normally later.
  Where ``torch._dynamo`` is already imported nothing is blocked.

Modules that need dynamo at import (``diffusers.hooks`` applies
``@torch.compiler.disable`` to its classes; the SD U-Net and the VAE import it) fail
with dynamo blocked and are imported again with the stand-ins alone. If that fails
too (a diffusers release whose modules need their package's ``__init__``), the
module is imported the ordinary way, so this can make an import slower, never fail.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import threading
from types import ModuleType

#: One import at a time: the stand-ins and the dynamo block are process-wide.
_LOCK = threading.Lock()


def diffusers_module(name: str) -> ModuleType:
    """Import the diffusers module ``name`` (e.g. ``"diffusers.models.unets.unet_2d"``) and return it.

    Imports only what that module needs (see the module docstring); a module
    already imported is returned as it is.
    """
    if name in sys.modules:
        return sys.modules[name]
    with _LOCK:
        # dynamo blocked, then not (diffusers.hooks' @torch.compiler.disable needs it: the
        # SD U-Net and the VAE import those), then the ordinary import
        for block in ("torch._dynamo" not in sys.modules, False):
            module = _import_beside(name, block)
            if module is not None:
                return module
    return importlib.import_module(name)


def _import_beside(name: str, block_dynamo: bool) -> ModuleType | None:
    """``name`` imported with the stand-in packages (and ``torch._dynamo`` blocked); None if that fails."""
    if name in sys.modules:
        return sys.modules[name]
    if block_dynamo:
        sys.modules["torch._dynamo"] = None  # an ImportError for `from torch._dynamo import ...`
    stand_ins: dict[str, ModuleType] = {}
    try:
        stand_ins = _stand_in_packages()
        return importlib.import_module(name)
    except (ImportError, AttributeError, RuntimeError):  # diffusers' lazy modules wrap an ImportError
        return None
    finally:
        _remove(stand_ins)
        if block_dynamo and sys.modules.get("torch._dynamo", 0) is None:
            del sys.modules["torch._dynamo"]


def _stand_in_packages() -> dict[str, ModuleType]:
    """Every subpackage of ``diffusers.models`` not imported yet, as an unexecuted package in sys.modules."""
    import diffusers.models

    made = {}
    for info in pkgutil.iter_modules(diffusers.models.__path__, "diffusers.models."):
        if not info.ispkg or info.name in sys.modules:
            continue
        spec = importlib.util.find_spec(info.name)
        if spec is None:
            continue
        made[info.name] = sys.modules[info.name] = importlib.util.module_from_spec(spec)
    return made


def _remove(stand_ins: dict[str, ModuleType]) -> None:
    if not stand_ins:
        return
    import diffusers.models

    for full, module in stand_ins.items():
        if sys.modules.get(full) is module:
            del sys.modules[full]
        attr = full.rpartition(".")[2]
        if diffusers.models.__dict__.get(attr) is module:
            # else the parent hands the stand-in to `from diffusers.models import unets`
            delattr(diffusers.models, attr)
