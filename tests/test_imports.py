"""No import circles inside quintet: every module's imports of other quintet modules, at module level
or inside functions (not under TYPE_CHECKING), form a graph without cycles, so any module imports on
its own and layers stay layers (core below data / training, systems above them)."""

from __future__ import annotations

import ast
from pathlib import Path

import quintet

ROOT = Path(quintet.__file__).resolve().parent.parent


def module_files() -> dict[str, Path]:
    files = {}
    for path in (ROOT / "quintet").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def import_graph() -> dict[str, set[str]]:
    files = module_files()

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_checking = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)
        }
        deps = set()
        for node in ast.walk(tree):
            if id(node) in type_checking:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quintet"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(resolve(full) if full in files else resolve(node.module))
            elif isinstance(node, ast.Import):
                deps.update(resolve(alias.name) for alias in node.names if alias.name.startswith("quintet"))
        graph[module] = {dep for dep in deps if dep is not None and dep != module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, done, path = [], set(), []

    def visit(node: str) -> None:
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in done:
                visit(dep)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return cycles


def test_the_checker_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_no_import_circles():
    graph = import_graph()
    assert "quintet.registry" in graph and "quintet.training.trainer" in graph
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_core_imports_nothing_above_it():
    for module, deps in import_graph().items():
        if module.startswith("quintet.core"):
            above = [dep for dep in deps if not dep.startswith("quintet.core")]
            assert not above, f"{module} imports {above}"
