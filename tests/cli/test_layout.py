"""The package layout says the architecture: no import cycle among the project's modules (imports inside
functions count too), the data layer never imports the training systems, readers apart from the DataModules, and
the generated demo sets apart from everything that reads user data."""

from __future__ import annotations

import ast
import functools
import inspect
import tokenize
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "datamodules"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Module name -> file, for cli.py and every module of `datamodules` and `lightning_modules`."""
    files = [REPO / "cli.py", *PACKAGE.rglob("*.py"), *(REPO / "lightning_modules").rglob("*.py")]
    return {module_name(p): p for p in files}


def imported_names(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may load: the module and, for `from M import x`, `M.x`."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against the importer's package
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (inside functions and classes too).
    Package `__init__` files are left out as targets: they are empty, and naming one imports none of its
    modules."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = imported_names(node, name, path.name == "__init__.py")
                found.update(
                    t for t in targets if t in modules and t != name and modules[t].name != "__init__.py"
                )
        graph[name] = found
    return graph


@functools.cache
def project_graph() -> dict[str, set[str]]:
    """The import graph of cli.py, `datamodules` and `lightning_modules` (parsed once per session)."""
    return import_graph(project_modules())


def datamodules_imports() -> dict[str, set[str]]:
    """Module -> the `datamodules` modules it imports anywhere in its body (function-level imports too)."""
    graph = project_graph()
    return {
        n: {d for d in deps if d.startswith("datamodules")}
        for n, deps in graph.items()
        if n.startswith("datamodules")
    }


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


def test_import_graph_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    source = "import os\ndef f():\n    from lightning_modules.b import x\n    from .c import y\n"
    node_names = [
        imported_names(n, "lightning_modules.a", False)
        for n in ast.walk(ast.parse(source))
        if isinstance(n, (ast.Import, ast.ImportFrom))
    ]
    assert node_names == [
        ["os"],
        ["lightning_modules.b", "lightning_modules.b.x"],
        ["lightning_modules.c", "lightning_modules.c.y"],
    ]


def test_no_import_cycle_among_the_project_modules() -> None:
    graph = project_graph()
    # the walk sees both packages, the CLI, and imports made inside functions
    assert {"cli", "lightning_modules.components.image_tower", "datamodules.tokenizer"} <= set(graph)
    assert "datamodules.image.shards.stream" in graph["datamodules.image.coco_datamodule"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_data_layer_never_imports_the_training_systems() -> None:
    graph = project_graph()
    upward = {
        name: sorted(d for d in deps if d.startswith("lightning_modules"))
        for name, deps in graph.items()
        if name.startswith("datamodules")
    }
    assert not any(upward.values()), {n: d for n, d in upward.items() if d}


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


# A module docstring is one short paragraph (two where a contract such as a batch format needs it); longer
# explanations belong in docs/.
DOCSTRING_WORDS = 150
MODULE_LINES = 620  # a file of the library does one job; past this it holds two
README_LINES = 250  # a front page; the details live under docs/


def module_docstring(path: Path) -> str:
    """The module docstring, read from the file's first tokens (parsing whole files would take longer)."""
    with path.open(encoding="utf-8") as f:
        for token in tokenize.generate_tokens(f.readline):
            if token.type == tokenize.STRING:
                return inspect.cleandoc(ast.literal_eval(token.string))
            if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE):
                return ""
    return ""


def test_module_docstring_reader() -> None:
    assert module_docstring(REPO / "datamodules" / "tokenizer.py") == ast.get_docstring(
        ast.parse((REPO / "datamodules" / "tokenizer.py").read_text(encoding="utf-8"))
    )


def test_module_docstrings_are_a_short_paragraph() -> None:
    sizes = {
        str(path.relative_to(REPO)): len(module_docstring(path).split())
        for path in project_modules().values()
        if path.name != "cli.py"
    }
    assert "lightning_modules/components/losses.py" in sizes and "datamodules/tokenizer.py" in sizes
    too_long = {name: words for name, words in sizes.items() if words > DOCSTRING_WORDS}
    assert not too_long, too_long


def test_no_library_module_is_over_about_600_lines() -> None:
    sizes = {
        str(path.relative_to(REPO)): len(path.read_text(encoding="utf-8").splitlines())
        for path in project_modules().values()
        if path.name != "cli.py"
    }
    assert "datamodules/text/mlm_prepare.py" in sizes
    too_long = {name: lines for name, lines in sizes.items() if lines > MODULE_LINES}
    assert not too_long, too_long


def test_the_readme_is_a_front_page() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_LINES, len(lines)
