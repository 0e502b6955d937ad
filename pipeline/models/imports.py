"""diffusers' model classes, imported without everything that sits beside them.

``from diffusers.models.unets.unet_2d import UNet2DModel`` executes the package
``diffusers.models.unets`` first, whose ``__init__`` imports every U-Net diffusers
ships; through them ``diffusers.models.transformers`` and its 70-odd transformers,
their LoRA and single-file loaders, Hugging Face ``transformers``' loss modules and
``scipy.stats``. And ``diffusers.models.modeling_utils`` (every model's base class)
imports two classes from ``diffusers.quantizers``, whose ``__init__`` also imports
``pipe_quant_config``, which imports Hugging Face ``transformers`` (0.6 s of imports
on a quiet machine) for a pipeline-level config a model never uses. Building the
digits model (weights and block discovery) in a fresh process after ``import torch``
took 4.0-4.7 CPU-s, 2.8-3.2 through this module without the quantizers' stand-in, in
every ``diffprobe run``, ``plan`` and ``blocks`` that builds one (benchmarks/RESULTS.md,
"Fixed cost of a run").

:func:`diffusers_module` imports one module with the eager subpackages of
``diffusers.models`` not imported yet standing in sys.modules as packages whose
``__init__`` has not run, so a module's own imports (``..transformers.transformer_2d``)
load only what they name; ``diffusers.quantizers`` stands in the same way, handing
out the names the model code imports from it (:data:`PARTIAL`) from their own
submodules on first access. Afterwards the stand-ins are removed: a later ``import
diffusers.models.unets`` (or ``from diffusers import UNet2DConditionModel``) runs the
real ``__init__``, which finds the modules already loaded and reuses them, so every
class keeps one identity. If the import fails that way (a diffusers release whose
modules need their package's ``__init__``), the module is imported the ordinary way,
so this can make an import slower, never fail.

``torch._dynamo`` is left alone: a run imports it anyway (``diffusers.utils`` imports
it for a decorator, ``from_pretrained``'s ``model.device`` through ``diffusers.hooks``,
and the block discovery on the meta device through torch's own ``_disable_dynamo``
around its Python reference ops); blocking it at the class import saved nothing
measurable.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import threading
from types import ModuleType

#: One import at a time: the stand-ins are process-wide.
_LOCK = threading.Lock()

#: Packages that stand in with some of their names: name -> the submodule (relative)
#: each comes from. ``diffusers.models.modeling_utils`` and ``model_loading_utils``
#: import these two from ``diffusers.quantizers``; the rest of its ``__init__``
#: (``PipelineQuantizationConfig``) imports Hugging Face ``transformers``.
PARTIAL = {"diffusers.quantizers": {"DiffusersAutoQuantizer": ".auto", "DiffusersQuantizer": ".base"}}


def diffusers_module(name: str) -> ModuleType:
    """Import the diffusers module ``name`` (e.g. ``"diffusers.models.unets.unet_2d"``) and return it.

    Imports only what that module needs (see the module docstring); a module
    already imported is returned as it is.
    """
    if name in sys.modules:
        return sys.modules[name]
    with _LOCK:
        stand_ins: dict[str, ModuleType] = {}
        try:
            stand_ins = _stand_in_packages()
            return importlib.import_module(name)
        except (ImportError, AttributeError, RuntimeError):  # diffusers' lazy modules wrap an ImportError
            pass  # imported the ordinary way below
        finally:
            _remove(stand_ins)
    return importlib.import_module(name)


def _stand_in_packages() -> dict[str, ModuleType]:
    """Every subpackage of ``diffusers.models`` and every :data:`PARTIAL` package not
    imported yet, as an unexecuted package in sys.modules."""
    import diffusers.models

    made = {}
    names = [info.name for info in pkgutil.iter_modules(diffusers.models.__path__, "diffusers.models.") if info.ispkg]
    for name in names + list(PARTIAL):
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        module = importlib.util.module_from_spec(spec)
        if name in PARTIAL:
            module.__getattr__ = _from_submodule(name, PARTIAL[name])
        made[name] = sys.modules[name] = module
    return made


def _from_submodule(package: str, sources: dict[str, str]):
    """A module ``__getattr__`` (PEP 562) that imports each name in ``sources`` from its submodule."""

    def __getattr__(name: str):
        if name not in sources:
            # `from package import name` then tries the submodule `package.name`
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(sources[name], package), name)

    return __getattr__


def _remove(stand_ins: dict[str, ModuleType]) -> None:
    if not stand_ins:
        return
    for full, module in stand_ins.items():
        if sys.modules.get(full) is module:
            del sys.modules[full]
        parent, _, attr = full.rpartition(".")
        holder = sys.modules.get(parent)
        if holder is not None and holder.__dict__.get(attr) is module:
            # else the parent hands the stand-in to `from diffusers.models import unets`
            delattr(holder, attr)
