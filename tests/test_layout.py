"""The code's layout, read statically (nothing imported): no import circle among mathtune's modules,
and private library API only in mathtune/compat.py.

Import circle: module A imports B and B (through any chain) imports A. Counted are ``import`` and
``from ... import`` statements at module level AND inside functions (lazy imports run too, only
later): an import inside a function still ties the two modules together, and a circle of them
leaves no module that can be read, tested or replaced first. ``if TYPE_CHECKING:`` imports never run
and are not counted, nor are imports by string (``importlib.import_module``: the lazy public names in
mathtune/__init__.py, the CLI's command table).

One kind of edge is left out: a package's ``__init__`` importing its own submodules inside a function
(the task registry in mathtune/tasks/__init__.py loads a task's module only when that task is named).
Python runs a package's ``__init__`` to completion before any of its submodules, so such an import
always finds the package whole; counting it would make every submodule that imports from its
package (``from mathtune.tasks import Example``) a circle. A package that imports its submodules at
module level is still counted.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "mathtune"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(import node, inside a function) for every import that can run."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    yield from visit(other, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            yield from visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                        ast.Lambda)))
    yield from visit(tree, False)


def import_graph() -> dict[str, set[str]]:
    """module -> the mathtune modules it imports (the left-out registry edges removed)."""
    modules = _modules()

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, (path, is_package) in modules.items():
        targets = set()
        for node, lazy in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [owner(alias.name) for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the package this module is in
                    package = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
                found = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else owner(base)
                         for alias in node.names]
            for target in found:
                if target is None or target == name:
                    continue
                if lazy and is_package and target.startswith(name + "."):
                    continue  # a registry loading its own submodule on demand (see the docstring)
                targets.add(target)
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_analysis_sees_lazy_imports_and_finds_a_circle():
    """The checker itself: a lazy import is an edge, and a two-module circle is found."""
    tree = ast.parse("import os\ndef f():\n    from mathtune import errors\nif TYPE_CHECKING:\n    import torch\n")
    assert [(type(node).__name__, lazy) for node, lazy in _imports(tree)] == [("Import", False), ("ImportFrom", True)]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "mathtune.tasks.rows" in graph["mathtune.tasks.hub"]  # a lazy import inside hub_examples
    assert "mathtune.errors" in graph["mathtune.tasks"]


def test_no_import_circle_among_mathtune_modules():
    found = circles(import_graph())
    assert not found, "import circles (move the shared piece into a module both import): " + "; ".join(
        " <-> ".join(component) for component in found)


# What the issue named as private library API, as its own grep spells it; mathtune/compat.py is where
# such access lives (the public attention setter too, beside its private getter).
PRIVATE_API = re.compile(r"inspect\.getsource|_attn_implementation|def _save|__dict__|tokenization_qwen2")


def _private_uses(path: Path) -> list[str]:
    return [f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
            for number, line in enumerate(path.read_text().splitlines(), start=1) if PRIVATE_API.search(line)]


def test_private_library_api_only_in_compat():
    found = [use for path in sorted(PACKAGE.rglob("*.py")) if path.name != "compat.py"
             for use in _private_uses(path)]
    assert not found, "private library API outside mathtune/compat.py:\n" + "\n".join(found)
