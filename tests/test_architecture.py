"""The package's shape stays what README's layout promises: no import loops, and imports only point down
the layers (a part may use the parts below it, never one above)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "streamer"
# Bottom to top, as README's "Project layout" lists them (top-level modules by their own name).
LAYERS = [
    "errors",
    "text",
    "models",
    "storage",
    "synthetic",
    "experts",
    "settings",
    "loader",
    "distributed",
    "generation",
    "serve",
    "tuning",
    "cli",
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (``from a.b import c`` counts a.b.c if it is a module)."""
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("streamer"):
                assert node.level == 0, f"{name}: relative import (the package uses absolute imports)"
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
        graph[name] = deps - {name, "streamer"}
    return graph


def _part(module: str) -> str:
    return module.split(".")[1]


def test_no_module_imports_a_layer_above_its_own():
    graph = _imports(_modules())
    up = [
        f"{m} -> {d}"
        for m, deps in graph.items()
        for d in deps
        if _part(m) != _part(d) and LAYERS.index(_part(d)) > LAYERS.index(_part(m))
    ]
    assert up == []
    assert {_part(m) for m in graph if m != "streamer"} <= set(LAYERS), "a new part needs a place in LAYERS"


def test_no_import_loops():
    graph = _imports(_modules())
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            assert state.get(d) != 1, "import loop: " + " -> ".join([*path, d])
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
