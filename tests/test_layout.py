"""The package layout says the architecture: no import cycles inside `datamodules/`, readers apart from the
DataModules, and the generated demo sets apart from everything that reads user data."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "datamodules"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def datamodules_imports() -> dict[str, set[str]]:
    """Module -> the `datamodules` modules it imports anywhere in its body (function-level imports too)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found.update(
                t for t in targets if t in modules and t != name and modules[t].name != "__init__.py"
            )
        graph[name] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_no_import_cycle_inside_datamodules() -> None:
    graph = datamodules_imports()
    assert "datamodules.image.coco_datamodule" in graph  # the walk sees the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_one_sub_package_per_modality_and_generated_sets_read_no_user_data() -> None:
    graph = datamodules_imports()
    for sub in ("text", "image", "speech", "synthetic"):
        assert (PACKAGE / sub / "__init__.py").is_file(), sub
    # the generators depend on nothing that reads user data
    for name, deps in graph.items():
        if name.startswith("datamodules.synthetic."):
            readers = {
                d
                for d in deps
                if d.startswith(("datamodules.text.", "datamodules.image.", "datamodules.speech."))
            }
            assert not readers, f"{name} imports {readers}"
