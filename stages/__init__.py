"""Stages: one module per stage, and the one explicit registry (no plugin scanning).

The registry names each stage's class by module path and imports a module only when
its kind is asked for: loading a workflow imports the stages it uses, so a workflow
without ``cka`` never imports scipy, one without ``extract`` / ``classify`` /
``probe`` never imports torch, and ``diffprobe --help`` imports none of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

#: stage kind -> "module:class" of its Stage.
STAGE_CLASSES = {
    "extract": "stages.extract:ExtractStage",
    "report": "stages.report:ReportStage",
    "pool": "stages.pool:PoolStage",
    "probe": "stages.probe:ProbeStage",
    "cka": "stages.cka:CKAStage",
    "classify": "stages.classify:ClassifyStage",
}


class StageRegistry(Mapping):
    """stage kind -> Stage class, importing the stage's module on first access."""

    def __init__(self, classes: dict[str, str]):
        self._classes = dict(classes)
        self._loaded: dict[str, type] = {}

    def __getitem__(self, kind: str) -> type:
        if kind not in self._loaded:
            module, _, name = self._classes[kind].partition(":")
            self._loaded[kind] = getattr(importlib.import_module(module), name)
        return self._loaded[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)


#: stage kind -> stage class.
STAGES = StageRegistry(STAGE_CLASSES)
