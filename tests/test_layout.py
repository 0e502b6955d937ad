"""The house rules of the source tree, checked by walking every import.

- ``pipeline/`` never imports ``stages`` (only ``pipeline.cli`` knows the registry);
- a stage module never imports another stage module;
- no import cycle between modules (imports inside functions count too: a lazy import
  hides a cycle from the interpreter, not from a reader).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    files = sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/**/*.py")])
    modules = {module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                # the longest known module the import names (``from pipeline import store``
                # names the package ``pipeline.store``)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


GRAPH = import_graph()


def test_the_walk_sees_the_tree():
    assert {"pipeline.workflow.runner", "pipeline.store.layout", "stages.extract"} <= GRAPH.keys()
    assert "pipeline.store.layout" in GRAPH["stages.extract"] or "pipeline.store" in GRAPH["stages.extract"]


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("pipeline")))
def test_the_framework_does_not_import_the_stages(module):
    if module.startswith("pipeline.cli"):
        return
    assert not {d for d in GRAPH[module] if d == "stages" or d.startswith("stages.")}, module


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("stages.")))
def test_a_stage_imports_no_other_stage(module):
    assert not {d for d in GRAPH[module] if d == "stages" or d.startswith("stages.")}, module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    # A package __init__ that re-exports its submodules' API is not a cycle with them.
    graph = {m: {d for d in deps if not (m.startswith(d + ".") and d in GRAPH)} for m, deps in GRAPH.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
