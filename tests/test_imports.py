"""The import graph: the node package never imports the laptop's, and no cycle.

Every module under ``himbeere/``, ``himbeerecouch/`` and ``uploader/`` is
parsed (not imported), so this needs no server.  Imports inside functions
count: a lazy import only postpones a cycle to the first call.  Imports
under ``if TYPE_CHECKING:`` do not, since they never run.

Edges, as Python runs them: ``import a.b`` and ``from a import b`` (``b`` a
module) lead to ``a.b``; ``from a import name`` leads to ``a`` (for a
package, its ``__init__`` re-exports ``name``).  Importing ``a.b`` also runs
``a/__init__.py`` first, but that is no edge: a package ``__init__`` that
imports its submodules, one of which imports a sibling, is no cycle unless
the sibling imports back.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

from tests.nodes import ROOT

PACKAGES = ("himbeere", "himbeerecouch", "uploader")

Graph = dict[str, set[str]]


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``packages``."""
    files: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree``, at any depth, but those under ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and is_type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imported_names(module: str, is_package: bool, tree: ast.AST) -> Iterator[str]:
    """The absolute names ``module`` imports: ``a.b`` or, for ``from a import x``, ``a.x``
    (resolve_edge decides whether ``a.x`` is a module or a name in ``a``)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:  # from .. import x: one level up from this module's package
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                source = f"{base}.{source}" if source else base
            for alias in node.names:
                yield source if alias.name == "*" else f"{source}.{alias.name}"
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name)
                       and node.func.id in ("import_module", "__import__")))):
            yield node.args[0].value  # importlib.import_module("uploader.main")


def resolve_edge(name: str, modules: set[str]) -> Optional[str]:
    """The project module that importing ``name`` leads to (None: not ours).

    ``a.b.c`` is the module itself if there is one, else ``a.b`` (``c`` is a
    name in it), else ``a``.
    """
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> Graph:
    """Module -> the project modules it imports, anywhere in its code."""
    files = module_files(root, packages)
    modules = set(files)
    graph: Graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for name in imported_names(module, path.name == "__init__.py", tree):
            target = resolve_edge(name, modules)
            # no edge for a package's __init__ that takes a name from itself
            if target is not None and target != module:
                edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: Graph) -> Optional[list[str]]:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = [start]
        on_path = {start}
        stack = [iter(sorted(graph[start]))]
        while stack:
            following = next(stack[-1], None)
            if following is None:
                stack.pop()
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                continue
            if following in on_path:
                return path[path.index(following):] + [following]
            if following in done:
                continue
            path.append(following)
            on_path.add(following)
            stack.append(iter(sorted(graph.get(following, ()))))
    return None


# -- the project -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph(ROOT)


def test_the_node_package_never_imports_the_laptop_package(graph: Graph) -> None:
    """A Pi runs himbeere/ and must not need (or load) uploader/ (issue 11)."""
    wrong = sorted(f"{module} -> {target}" for module, targets in graph.items()
                   if module.split(".")[0] == "himbeere"
                   for target in targets if target.split(".")[0] == "uploader")
    assert wrong == []


def test_no_module_imports_itself_round_about(graph: Graph) -> None:
    """Regression: himbeere.cli <-> uploader.opscli and dashboard.app <-> api/pages."""
    assert "himbeere.cli" in graph and "uploader.dashboard.app" in graph  # the walk found them
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# -- the checker itself, on made-up trees ----------------------------------------------------
def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_lazy_import_inside_a_function_still_makes_a_cycle(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {
        "node/__init__.py": "",
        "node/cli.py": "def main():\n    from laptop.ops import run\n",
        "node/boot.py": "import importlib\nimportlib.import_module('laptop')\n",
        "laptop/__init__.py": "",
        "laptop/ops.py": "from node import cli\n",
    })
    graph = import_graph(root, ("node", "laptop"))
    assert graph["node.cli"] == {"laptop.ops"} and graph["laptop.ops"] == {"node.cli"}
    assert graph["node.boot"] == {"laptop"}
    assert find_cycle(graph) in (["node.cli", "laptop.ops", "node.cli"],
                                 ["laptop.ops", "node.cli", "laptop.ops"])


def test_a_package_that_imports_its_submodules_is_no_cycle(tmp_path: Path) -> None:
    """``pkg/__init__`` re-exports from ``a`` and ``b``; ``b`` imports its sibling
    ``a``; a module outside takes a re-exported name from ``pkg``."""
    files = {
        "pkg/__init__.py": "from .a import A\nfrom .b import B\n",
        "pkg/a.py": "import os\nA = 1\n",
        "pkg/b.py": "from . import a\nfrom .a import A\nB = a.A\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..a import A\nfrom .. import b\nfrom pkg.sub import d\n",
        "pkg/sub/d.py": "from typing import TYPE_CHECKING\n"
                        "if TYPE_CHECKING:\n    from pkg.sub import c\n",
        "app/__init__.py": "",
        "app/user.py": "from pkg import A, B\n",
    }
    graph = import_graph(write_tree(tmp_path, files), ("pkg", "app"))
    assert graph["app.user"] == {"pkg"}
    assert graph["pkg"] == {"pkg.a", "pkg.b"}
    assert graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.sub.c"] == {"pkg.a", "pkg.b", "pkg.sub.d"}
    assert graph["pkg.sub.d"] == set()  # TYPE_CHECKING imports never run
    assert find_cycle(graph) is None


def test_a_submodule_that_imports_its_package_back_is_a_cycle(tmp_path: Path) -> None:
    files = {
        "pkg/__init__.py": "from .a import A\nfrom .b import B\n",
        "pkg/a.py": "A = 1\n",
        "pkg/b.py": "from pkg import A\nB = A\n",  # pkg is half-imported when b runs
    }
    graph = import_graph(write_tree(tmp_path, files), ("pkg",))
    assert find_cycle(graph) == ["pkg", "pkg.b", "pkg"]
