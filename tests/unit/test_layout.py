"""The house (issue [18]): the package's shape, checked so it does not drift.

* At most 8 flat modules at the top of ``pmlb``; everything else lives in a
  package named for its role (CONTRIBUTING.md has the map).
* No import circle between those rooms, counting every import (at run time,
  inside functions and under TYPE_CHECKING alike: a circle hidden from the
  interpreter is still one for the reader).
* No import circle between modules either.
* No class over 400 lines, no function over 80.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.support import ROOT

PKG = ROOT / "node" / "pmlb"
MAX_FLAT = 8
MAX_CLASS = 400
MAX_FUNCTION = 80


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG.parent).with_suffix("")
        if "_proto" in rel.parts:
            continue
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_at_most_eight_flat_modules() -> None:
    flat = sorted(f.stem for f in PKG.glob("*.py") if f.stem not in ("__init__", "__main__"))
    assert len(flat) <= MAX_FLAT, f"{len(flat)} flat modules: {flat}; give new ones a package"


def test_no_circle_between_rooms() -> None:
    graph = _imports(_modules())
    rooms: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        for dep in deps:
            if _room(dep) != _room(mod) and _room(dep) != "pmlb":
                rooms.setdefault(_room(mod), set()).add(_room(dep))
    assert _circles(rooms) == []


def test_no_circle_between_modules() -> None:
    """The data plane's conn, link, plane and watch imported each other (under
    TYPE_CHECKING); each now declares what it needs of the others as a
    Protocol where it is used, and only the plane, which builds them,
    imports them."""
    assert _circles(_imports(_modules())) == []


def _sizes() -> Iterator[tuple[str, str, str, int]]:
    for mod, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                assert node.end_lineno is not None
                yield mod, node.name, kind, node.end_lineno - node.lineno + 1


def test_no_class_or_function_grows_past_its_bound() -> None:
    over = sorted(
        (mod, name, lines)
        for mod, name, kind, lines in _sizes()
        if lines > (MAX_CLASS if kind == "class" else MAX_FUNCTION)
    )
    assert over == [], "split these"
