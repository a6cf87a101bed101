"""The package's shape: no import cycle, lower layers never import higher ones or Ray."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raytrain_vae"
# The bottom of the stack: what a model, its maths and its files need. None of these may import
# the training, search or batch-job layers, nor Ray.
LOWER = {
    "version",
    "ray_notices",
    "block_shuffle",
    "config",
    "outputs",
    "likelihoods",
    "models",
    "model_io",
    "objectives",
    "diagnostics",
    "data",
    "perf",
    "checkpoint",
    "loop",
    "faults",
    "optim",
    "storage",
    "pictures",
    "tensorboard_log",
    "mlflow_runs",
    "mlflow_sink",
    "tracking",
}
HIGHER = {
    "worker",
    "rank_host",
    "trial",
    "training",
    "train",
    "api",
    "tune",
    "search_space",
    "search_results",
    "live_view",
    "runtime",
    "export",
    "generate",
    "batch_actors",
    "evaluation",
    "evaluate",
    "images",
    "inputs",
    "input_rows",
    "cli",
    "ingest",
    "search_tracking",
    "commands",
    "__main__",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module an import statement in the file names, at any depth (function-level too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in imports_of(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (a depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_and_a_clean_graph():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    # A package __init__ importing its own submodules is not a cycle for Python, but a
    # submodule importing its package's __init__ while the __init__ imports it back is.
    assert find_cycle(package_graph()) is None


def test_every_module_is_placed_in_a_layer():
    tops = {name.split(".")[1] for name in package_graph() if name != "raytrain_vae"}
    assert tops <= LOWER | HIGHER, sorted(tops - LOWER - HIGHER)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_lower_layers_import_neither_higher_layers_nor_ray(path):
    name = module_name(path)
    if name == "raytrain_vae" or name.split(".")[1] not in LOWER:
        return
    for imported in imports_of(path):
        parts = imported.split(".")
        assert parts[0] != "ray", f"{name} imports {imported}"
        if parts[0] == "raytrain_vae" and len(parts) > 1:
            assert parts[1] not in HIGHER, f"{name} imports {imported}"


def test_every_module_says_what_it_owns():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path} has no module docstring"
