"""The package's shape: folders are layers and imports only point down; no cycles; short functions.

    cli → training / serve → reports → inference → model → core (the modules directly under llmclf/)

A module may import from its own folder and from lower layers, never from a higher layer or from a
sibling at its own level (training and serve do not import each other). Imports inside functions count
too: a lazy import is still a dependency. The package's `__init__` (the public facade, whose lazy
attributes reach up to `Classifier` and `train`) and `__main__` stand outside the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = {"cli": 5, "training": 4, "serve": 4, "reports": 3, "inference": 2, "model": 1}
OUTSIDE_LAYERS = {"llmclf", "llmclf.__main__"}
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imported(name: str, tree: ast.AST) -> set[str]:
    """The llmclf modules a module imports anywhere in its body (functions included)."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            submodules = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in the package's __init__
                found.add(base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imported(name, ast.parse(path.read_text(encoding="utf-8"))) for name, path in MODULES.items()}


def layer(name: str) -> tuple[int, str]:
    """(rank, folder): core modules are rank 0, each in a folder of its own for the sibling rule."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[1] in LAYERS:
        return LAYERS[parts[1]], parts[1]
    if len(parts) == 2 and parts[1] in LAYERS:  # a layer package's __init__
        return LAYERS[parts[1]], parts[1]
    return 0, "core"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, targets in graph.items():
        if name in OUTSIDE_LAYERS:
            continue
        rank, folder = layer(name)
        for target in sorted(targets - OUTSIDE_LAYERS):
            target_rank, target_folder = layer(target)
            if target_rank > rank or (target_rank == rank and target_folder != folder):
                bad.append(f"{name} ({folder}) imports {target} ({target_folder})")
    return bad


def test_the_package_has_no_import_cycle():
    assert cycles(GRAPH) == []


def test_imports_only_point_down_the_layers():
    assert layer_violations(GRAPH) == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    # The same functions on a made-up graph: they must be able to fail.
    graph = {
        "llmclf.model.loading": {"llmclf.inference.predict"},  # up a layer
        "llmclf.inference.predict": {"llmclf.model.loading"},  # and back: a cycle
        "llmclf.training.pipeline": {"llmclf.serve.app"},  # a sibling layer
        "llmclf.serve.app": set(),
    }
    assert cycles(graph) == [["llmclf.inference.predict", "llmclf.model.loading"]]
    assert layer_violations(graph) == [
        "llmclf.model.loading (model) imports llmclf.inference.predict (inference)",
        "llmclf.training.pipeline (training) imports llmclf.serve.app (serve)",
    ]


def long_functions(path: Path, root: Path = SRC) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        f"{path.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_functions_and_modules_stay_short(name):
    path = MODULES[name]
    assert long_functions(path) == []
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_MODULE_LINES


def test_the_length_check_catches_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    long = tmp_path / "long.py"
    long.write_text(f"def f():\n{body}\n", encoding="utf-8")
    assert long_functions(long, tmp_path) == [f"long.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]
