"""The package's import graph has no cycle, and no module imports through an old (moved) path.

The graph is built from the source (AST), not by importing: an edge ``a -> b`` for every import that
runs when ``a`` is imported (module level, ``try`` / ``if`` blocks included; ``if TYPE_CHECKING:`` and
imports inside functions excluded: they cannot take part in an import-time cycle). Relative imports
are resolved, ``from p import m`` names the submodule ``p.m`` when there is one, and importing
``p.q.m`` also imports the packages ``p`` and ``p.q`` (unless they are the importing module's own,
which are initialising already when it runs). An old path (``protein_lm._moved.MOVED``) stands
for the modules that now hold it.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import protein_lm
from protein_lm._moved import MOVED

# Modules allowed to import an old (moved) path: none.
OLD_PATH_USERS: dict[str, set[str]] = {}


def modules() -> dict[str, Path]:
    """Every module of protein_lm -> its source file (packages -> their __init__.py)."""
    found = {"protein_lm": Path(protein_lm.__file__)}
    for info in pkgutil.walk_packages(protein_lm.__path__, "protein_lm."):
        spec = info.module_finder.find_spec(info.name)
        assert spec is not None and spec.origin, info.name
        found[info.name] = Path(spec.origin)
    return found


def _runtime_imports(body: list[ast.stmt]):
    """Import statements executed at import time, in ``body`` and its nested blocks."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            ):
                yield from _runtime_imports(node.orelse)
                continue
            yield from _runtime_imports(node.body)
            yield from _runtime_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _runtime_imports(block)
        elif isinstance(node, ast.With):
            yield from _runtime_imports(node.body)


def imported_names(name: str, path: Path, known: set[str]) -> set[str]:
    """Module names (inside protein_lm or old paths) that importing ``name`` imports directly."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _runtime_imports(tree.body):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module]
            targets += [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in known]
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # p.q.m imports p and p.q first
                candidate = ".".join(parts[:i])
                if name.startswith(candidate + "."):
                    continue  # the module's own packages: initialising already when it runs
                if candidate in known or candidate in MOVED:
                    out.add(candidate)
    out.discard(name)
    return out


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(graph, old path uses)``: module -> modules it imports (old paths resolved), and the old paths."""
    found = modules()
    known = set(found)
    graph: dict[str, set[str]] = {}
    old_uses: dict[str, set[str]] = {}
    for name, path in found.items():
        direct = imported_names(name, path, known)
        old = direct & set(MOVED)
        if old:
            old_uses[name] = old
        graph[name] = {m for m in direct - old if m in known} | {t for o in old for t in MOVED[o]}
    return graph, old_uses


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component with a cycle (Tarjan), as a path a -> ... -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for component in components:  # a shortest cycle from the component's first module, for the message
        members, start = set(component), component[0]
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        cycle = paths[v] + [start]
                        break
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        found.append(cycle)
    return found


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["e", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_resolves_relative_imports_and_submodules():
    graph, _ = import_graph()
    assert "protein_lm.data.datasets" in graph["protein_lm.data.datamodule"]
    assert "protein_lm.attention.ops.causal" in graph["protein_lm.attention.ops.favor"]  # `from .causal import ...`
    assert "protein_lm.data" in graph["protein_lm.commands.train"]  # the package of what it imports
    assert "protein_lm.data" not in graph["protein_lm.data.datamodule"]  # not its own package
    assert "protein_lm.data.tokenizer" in graph["protein_lm.model_config"]
    assert "protein_lm.checkpoint" not in graph["protein_lm.commands.spans"]  # imported inside run() only
    assert "protein_lm.commands.analyze" not in graph["protein_lm.commands.spans"]


def test_no_import_cycles():
    graph, _ = import_graph()
    bad = cycles(graph)
    assert not bad, "import cycles:\n" + "\n".join(" -> ".join(c) for c in bad)


def test_no_module_imports_an_old_path():
    _, old_uses = import_graph()
    assert old_uses == OLD_PATH_USERS, f"imports through moved paths (use protein_lm.data.*): {old_uses}"
