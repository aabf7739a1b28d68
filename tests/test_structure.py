"""The package's shape: layers only import downwards (config/paths < data < model < trainer < api < cli),
no import circles among modules, no function grows past ~60 lines (a file is as long as its
concern needs: ruff keeps the format)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sftlab"
LAYERS = {
    "compat": 0,
    "errors": 0,
    "config": 0,
    "migrate": 0,
    "paths": 0,
    "data": 1,
    "demo": 1,
    "model": 2,
    "trainer": 3,
    "api": 4,
    "trl_forms": 4,
    "trl_callbacks": 4,
    "cli": 5,
    "cli_checks": 5,
    "__init__": 5,
}
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """sftlab module -> the sftlab modules it imports (anywhere in the file, function bodies included)."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        name = _module_name(path)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sftlab"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)  # `from sftlab.data import cache`
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("sftlab"))
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else LAYERS["__init__"]


def test_layers_only_import_downwards():
    graph = _imports()
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if _layer(d) > _layer(m))
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = _imports()
    cycles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in stack:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in done:
                visit(dep, stack + [dep], done)
        done.add(node)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module], done)
    assert not cycles, "import circles:\n" + "\n".join(sorted(set(cycles)))


def test_functions_stay_short():
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "functions longer than ~60 lines:\n" + "\n".join(long)
