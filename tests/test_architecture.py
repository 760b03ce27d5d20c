"""The import rules of docs/ARCHITECTURE.md, checked on the source: a forbidden import fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Package -> the project packages it may import (besides itself). The science core imports nothing of
# the edge; the service (daemon) imports nothing of the command line, the lab or the console.
ALLOWED: dict[str, set[str]] = {
    "csflow": set(),
    "drift": set(),
    "adapters": {"csflow", "drift"},
    "daemon": {"csflow", "adapters", "drift"},
    "console": {"daemon", "csflow", "drift"},
    "lab": {"csflow", "adapters", "drift", "daemon"},
    "cli": {"csflow", "adapters", "drift", "daemon", "lab", "console"},
}
PACKAGES = [p for p in ALLOWED if (ROOT / p).is_dir()]


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, top_level_only: bool) -> set[str]:
    """Project modules named by import statements (all of them, or only those run at import time)."""
    names: set[str] = set()
    nodes = tree.body if top_level_only else ast.walk(tree)  # type: ignore[attr-defined]
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in ALLOWED}


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_what_its_layer_allows(package: str) -> None:
    bad = []
    for path in modules(package):
        for name in imported(ast.parse(path.read_text()), top_level_only=False):
            top = name.split(".")[0]
            if top != package and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules() -> None:
    """Module-level imports form no cycle (a lazy import inside a function does not count)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in modules(package):
            deps = imported(ast.parse(path.read_text()), top_level_only=True)
            graph[module_name(path)] = {d for d in deps if d != module_name(path)}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_checker_sees_a_forbidden_import() -> None:
    """The rule check itself can say no: an edge import inside the science core is found."""
    source = "import torch\nfrom daemon.store import Keys\n\ndef f():\n    from lab.plots import plot_timeline\n"
    tree = ast.parse(source)
    assert imported(tree, top_level_only=False) == {"daemon.store", "lab.plots"}
    assert imported(tree, top_level_only=True) == {"daemon.store"}
    assert not {"daemon", "lab"} <= ALLOWED["csflow"]
