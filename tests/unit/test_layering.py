"""The module import graph of ``src/warden``: no cycles, and one module touches regopy.

The graph is built from the source's AST, not by importing it, so a module
that is never imported in a test run is still checked. The rules (see
``docs/adr/0006-policy-package-layout.md``):

* every ``import`` and ``from ... import`` counts, wherever it is: at module
  level, inside functions (a deferred import is still a dependency, and
  deferring was how cycles were hidden), and under ``if TYPE_CHECKING:`` (a
  module that names its caller's type still knows its caller: ``engine`` ↔
  ``activation`` was such a cycle; a ``Protocol`` breaks it);
* ``from package import name`` is an edge to ``package.name`` when that is a
  module, else to ``package`` itself; importing a submodule is not counted
  as importing its parent packages' ``__init__``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "warden"
# The one module that binds the Rego engine's library (regopy) directly.
REGO_MODULE = "warden.policy.rego"


def module_files(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` under ``src``, by dotted name."""
    out: dict[str, Path] = {}
    for file in sorted((src / package).rglob("*.py")):
        parts = list(file.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = file
    return out


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree``, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node


def imported_names(name: str, file: Path, modules: Mapping[str, Path]) -> set[str]:
    """The absolute names ``name`` imports: modules where they are modules."""
    is_package = file.name == "__init__.py"
    out: set[str] = set()
    for stmt in _imports(ast.parse(file.read_text(encoding="utf-8"), str(file))):
        if isinstance(stmt, ast.Import):
            out.update(alias.name for alias in stmt.names)
            continue
        base = stmt.module or ""
        if stmt.level:
            # Relative: strip ``level`` components (one fewer for a package's __init__).
            anchor = name.split(".")
            cut = stmt.level - 1 if is_package else stmt.level
            anchor = anchor[: len(anchor) - cut] if cut else anchor
            base = ".".join([*anchor, base] if base else anchor)
        for alias in stmt.names:
            candidate = f"{base}.{alias.name}"
            out.add(candidate if candidate in modules else base)
    return out


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """Edges between the modules of ``package`` (imports of other packages are dropped)."""
    modules = module_files(src, package)
    return {
        name: {m for m in imported_names(name, file, modules) if m in modules and m != name}
        for name, file in modules.items()
    }


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: set[str] = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_a_cycle(graph, c) for c in components]


def _a_cycle(graph: Mapping[str, set[str]], component: set[str]) -> list[str]:
    """A concrete cycle inside a strongly connected component, to name in a failure."""
    start = min(component)
    path = [start]
    seen = {start}
    parents: dict[str, str] = {}
    frontier = [start]
    # Breadth-first back to ``start``: the shortest cycle through it.
    while frontier:
        nxt_frontier: list[str] = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    cycle = [node]
                    while cycle[-1] != start:
                        cycle.append(parents[cycle[-1]])
                    return [*reversed(cycle), start]
                if nxt not in seen:
                    seen.add(nxt)
                    parents[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return path  # pragma: no cover - a strongly connected component always has a cycle


def test_the_package_has_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_exactly_one_module_imports_regopy() -> None:
    modules = module_files()
    importers = sorted(
        name
        for name, file in modules.items()
        if any(
            m == "regopy" or m.startswith("regopy.") for m in imported_names(name, file, modules)
        )
    )
    assert importers == [REGO_MODULE]


def test_the_engine_never_imports_the_bundle_tools_back() -> None:
    graph = import_graph()
    for engine_module in ("warden.policy.engine", "warden.policy.worker", "warden.policy.rego"):
        reached = _reachable(graph, engine_module)
        assert not {m for m in reached if m.startswith("warden.policy.authoring")}, engine_module
    # The bundle subpackage never reaches the engine, its workers or the authoring tools.
    for name in graph:
        if name.startswith("warden.policy.bundle"):
            reached = _reachable(graph, name)
            assert "warden.policy.engine" not in reached, name
            assert not {m for m in reached if m.startswith("warden.policy.authoring")}, name


def test_the_proxy_process_never_loads_the_engine() -> None:
    # Loading regopy loads rego-cpp's C library; only policy workers and tools need it.
    code = (
        "import sys, warden.server, warden.cli, warden.cli_policy, warden.policy.engine, "
        "warden.policy.activation, warden.policy.bundle, warden.policy.authoring; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'regopy' "
        "or m == 'warden.policy.rego'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def _reachable(graph: Mapping[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# --- the graph builder itself ----------------------------------------------------------------


def _tree(tmp_path: Path, files: Mapping[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path


def test_function_level_imports_make_edges(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from pkg import b\n",
            "b.py": "def f():\n    import pkg.a\n",
        },
    )
    assert find_cycles(import_graph(src, "pkg")) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_type_checking_imports_make_edges_too(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from pkg.b import B\n",
            "b.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\n"
            ),
        },
    )
    graph = import_graph(src, "pkg")
    assert graph["pkg.b"] == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_relative_imports_and_names_resolve(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "__init__.py": "from .sub import thing\n",
            "sub/__init__.py": "from . import leaf\nfrom .leaf import value\n",
            "sub/leaf.py": "from .. import sub\nfrom ..sub import leaf as me\n",
        },
    )
    graph = import_graph(src, "pkg")
    assert graph["pkg"] == {"pkg.sub"}
    assert graph["pkg.sub"] == {"pkg.sub.leaf"}
    assert graph["pkg.sub.leaf"] == {"pkg.sub"}
    assert find_cycles(graph) == [["pkg.sub", "pkg.sub.leaf", "pkg.sub"]]


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c", "a"]]),
    ],
)
def test_find_cycles_names_the_modules(
    edges: dict[str, set[str]], expected: list[list[str]]
) -> None:
    assert find_cycles(edges) == expected
