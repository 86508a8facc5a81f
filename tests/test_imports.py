"""The package's import structure: no cycles, and optional backends loaded only when chosen."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "muscle_ray"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(tree: ast.Module, modules: set[str]) -> set[str]:
    """The package's modules a module imports anywhere: at the top and inside functions (a lazy
    import is a cycle too, only a later one), but not under `if TYPE_CHECKING:`."""
    found: set[str] = set()
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs or ({node.module} & modules)
        elif not is_type_checking(node):
            todo += ast.iter_child_nodes(node)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imports_of(ast.parse(p.read_text(), str(p)), set(files)) - {m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_graph_sees_imports_and_cycles():
    """The checker itself: it finds top-level and lazy imports, and a cycle where there is one."""
    graph = import_graph()
    assert "muscle_ray.serving.engine_types" in graph["muscle_ray.serving.hf_engine"]
    assert {"muscle_ray.serving.hf_engine", "muscle_ray.serving.vllm_engine"} <= graph["muscle_ray.serving.engine"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_one_that_imports_it_back():
    assert find_cycle(import_graph()) is None


def test_engine_interfaces_load_no_backend():
    """Choosing a backend imports it; the interfaces alone load neither engine nor vllm, and the
    vLLM modules import (failing only when used) where vllm is not installed."""
    code = (
        "import sys\n"
        "import muscle_ray.serving.engine, muscle_ray.scoring.backend\n"
        "loaded = [m for m in sys.modules if m.startswith('vllm') or m.endswith(('hf_engine', 'vllm_engine'))"
        " or m in ('muscle_ray.scoring.hf', 'muscle_ray.scoring.vllm')]\n"
        "assert not loaded, loaded\n"
        "import muscle_ray.serving.vllm_engine, muscle_ray.scoring.vllm\n"
        "assert not any(m.startswith('vllm') for m in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
