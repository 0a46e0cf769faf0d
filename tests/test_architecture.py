"""The package layout's rules (ARCHITECTURE.md): stage packages import only from earlier stages
and the shared modules, and no import forms a cycle, at any level.

The graph is read with ``ast`` from every ``import``/``from … import`` anywhere in a module:
at module level, inside functions and classes, under ``if TYPE_CHECKING:``, relative ones, and
``importlib.import_module("affpipe…")``/``__import__("affpipe…")`` with a literal name. A
function-level import only postpones a cycle, so it counts. Imports under ``TYPE_CHECKING``
count too: they cannot cycle at run time, but a type two modules need both ways belongs in a
module below both. Importing ``affpipe.a.b`` also runs ``affpipe/a/__init__.py``, so it is an
edge to ``affpipe.a`` as well (unless ``affpipe.a`` is the importer's own package, which Python
has loaded first).
"""

from __future__ import annotations

import ast
from pathlib import Path

import affpipe

ROOT = Path(affpipe.__file__).resolve().parent
# Pipeline order; the shared modules (level 0) may be imported by anyone.
LEVEL = {"labels": 0, "batch": 0, "dist": 0, "io": 0, "_optional": 0, "lineage": 0, "outdir": 0, "synth": 1, "index": 2, "shards": 3,
         "twin": 3.5, "loaders": 4, "pretrain": 4.5, "train": 5, "temporal": 6, "runs": 6.5, "experiments": 7, "bench": 8, "cli": 9,
         "__main__": 9, "__init__": 0}

# Cycles being removed by changes not merged yet, each as the set of modules it joins. Only
# these may remain; an entry that is no longer a cycle fails the test too, so it is deleted as
# soon as the change removing it lands (the set ends empty).
KNOWN_CYCLES_BEING_REMOVED: set[frozenset[str]] = set()

Edge = tuple[str, str, int]  # (importer, imported, line)


def _modules(root: Path = ROOT, package: str = "affpipe") -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _named(node: ast.AST, importer: str, is_package: bool, package: str) -> list[str]:
    """The dotted names ``node`` imports from ``package`` (a module, or a module plus a name)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolved against the importer's package
            here = importer.split(".") if is_package else importer.split(".")[:-1]
            here = here[: len(here) - (node.level - 1)]
            base = ".".join([*here, base] if base else here)
        return [f"{base}.{a.name}" for a in node.names]
    if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__"):
            return [node.args[0].value]
    return []


def _edges(modules: dict[str, Path], package: str = "affpipe") -> list[Edge]:
    """Every import between ``modules``, wherever it is written in the importer (once a line)."""
    edges = set()
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in _named(node, name, path.name == "__init__.py", package):
                if target.split(".")[0] != package:
                    continue
                while target not in modules and "." in target:  # `from m import name`: m
                    target = target.rsplit(".", 1)[0]
                mine = _ancestors(name)
                for t in [target, *_ancestors(target)]:  # a submodule runs its package first
                    if t in modules and t != name and (t == target or t not in mine):
                        edges.add((name, t, node.lineno))
    return sorted(edges)


def _cycles(edges: list[Edge]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
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
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _describe(cycle: frozenset[str], edges: list[Edge], modules: dict[str, Path]) -> str:
    lines = [f"  {modules[a].relative_to(ROOT.parent)}:{n}: {a} imports {b}"
             for a, b, n in sorted(edges) if a in cycle and b in cycle]
    return "cycle " + " <-> ".join(sorted(cycle)) + "\n" + "\n".join(lines)


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_top_level_name_has_a_level():
    names = {p.name.removesuffix(".py") for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert names <= set(LEVEL), names - set(LEVEL)


def test_no_upward_import_between_stages():
    modules = _modules()
    bad = [f"{modules[a].relative_to(ROOT.parent)}:{n}: {a} imports {b}" for a, b, n in _edges(modules)
           if _stage(a) != _stage(b) and LEVEL[_stage(b)] > LEVEL[_stage(a)]]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_at_any_level():
    modules = _modules()
    edges = _edges(modules)
    cycles = _cycles(edges)
    new = [c for c in cycles if c not in KNOWN_CYCLES_BEING_REMOVED]
    assert not new, "\n".join(_describe(c, edges, modules) for c in new)
    gone = KNOWN_CYCLES_BEING_REMOVED - set(cycles)
    assert not gone, f"no longer cycles: delete {sorted(map(sorted, gone))} from KNOWN_CYCLES_BEING_REMOVED"


def test_the_reader_sees_imports_hidden_anywhere(tmp_path):
    """Each way of writing an import is an edge; a cycle made of them is found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import inner  # its own submodule\n")
    (pkg / "sub" / "inner.py").write_text("X = 1\n")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import T\n")
    (pkg / "c.py").write_text("class K:\n    def m(self):\n        from . import d\n")
    (pkg / "d.py").write_text("import importlib\nimportlib.import_module('pkg.sub.inner')\n")
    (pkg / "sub" / "e.py").write_text("from ..a import f\nfrom pkg.sub import X\n")
    modules = _modules(pkg, "pkg")
    found = {(a, b) for a, b, _ in _edges(modules, "pkg")}
    assert found == {
        ("pkg.sub", "pkg.sub.inner"), ("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.c", "pkg.d"),
        ("pkg.d", "pkg.sub.inner"), ("pkg.d", "pkg.sub"), ("pkg.sub.e", "pkg.a"), ("pkg.sub.e", "pkg.sub"),
    }
    assert _cycles(_edges(modules, "pkg")) == []
    (pkg / "sub" / "inner.py").write_text("def g():\n    import pkg.a\n")  # closes a -> b -> c -> d -> inner -> a
    cycles = _cycles(_edges(_modules(pkg, "pkg"), "pkg"))
    assert cycles == [frozenset({"pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.sub", "pkg.sub.inner"})]
