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
LEVEL = {"labels": 0, "batch": 0, "dist": 0, "io": 0, "_optional": 0, "lineage": 0, "outdir": 0, "synth": 1, "video": 1.5, "index": 2, "shards": 3,
         "twin": 3.5, "loaders": 4, "models": 4.3, "scoring": 4.5, "run": 4.7, "train": 5, "pretrain": 5.5, "temporal": 6, "runs": 6.5, "experiments": 7, "bench": 8, "cli": 9,
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


# --- one owner for the run folder, one place that picks a kind of run -------------------------

RUN_FILE_NAMES = ("best.pt", "last.pt", "config.json", "lineage.json", "metrics.jsonl", "curves.png", "eval.json",
                  "eval.md", "au_thresholds.json", "smoothing.json", "eval_predictions.npz", "_predictions.npz")
RUN_FOLDER_OWNER = "affpipe.run.folder"


def _strings(tree: ast.AST):
    """Every string constant of a module but its docstrings (module, class, function)."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node


def test_no_run_file_name_is_spelled_outside_the_run_folder_module():
    """Item 1 of the run-kinds restructuring: ``affpipe.run.folder`` names every file a run
    holds; no other module spells one (help texts and messages may mention them in prose)."""
    bad = []
    for module, path in _modules().items():
        if module == RUN_FOLDER_OWNER:
            continue
        for node in _strings(ast.parse(path.read_text())):
            value = node.value.strip()
            if value in RUN_FILE_NAMES or value.endswith(tuple("/" + n for n in RUN_FILE_NAMES)) or (
                    value.endswith("_predictions.npz")):
                bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {value!r}")
    assert not bad, "run-folder file names outside affpipe/run/folder.py:\n" + "\n".join(bad)


# Modules allowed to pick or test the kind of a run: the registry, each kind's own module, and the
# config that builds a kind's data.
KIND_OWNERS = {"affpipe.runs.kinds", "affpipe.train.frames", "affpipe.temporal.kind", "affpipe.run.config",
               "affpipe.run.kind"}
KIND_TYPES = {"ShardsData", "FeaturesData"}


def _kind_branches(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("is_temporal", "feature_tables"):
            out.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} if len(node.args) > 1 else set()
            if names & KIND_TYPES:
                out.append((node.lineno, "isinstance(..., a run's data type)"))
        elif isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            kinds = any(isinstance(p, ast.Constant) and p.value in ("frames", "temporal", "pretrain") for p in parts)
            attrs = any(isinstance(p, ast.Attribute) and (p.attr == "kind" or (
                p.attr == "name" and isinstance(p.value, ast.Attribute) and p.value.attr == "kind")) for p in parts)
            if kinds and attrs:
                out.append((node.lineno, "a comparison with a kind's name"))
            if any(isinstance(p, ast.Attribute) and p.attr == "features" for p in parts) and any(
                    isinstance(p, ast.Constant) and p.value is None for p in parts):
                out.append((node.lineno, "features is (not) None"))
    return out


def test_no_module_outside_the_registry_branches_on_the_kind_of_run():
    """Item 2: ``affpipe.runs.kinds`` picks a run's kind; the loop, the run folder, open_run,
    evaluate, predict, embed, report and experiments ask the kind instead of testing it."""
    bad = []
    for module, path in _modules().items():
        if module in KIND_OWNERS or LEVEL.get(_stage(module), 0) < LEVEL["models"] or _stage(module) == "bench":
            continue
        for line, what in _kind_branches(ast.parse(path.read_text())):
            bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {what}")
    assert not bad, "branches on the kind of run outside affpipe/runs/kinds.py:\n" + "\n".join(bad)


def test_a_per_frame_run_never_calls_temporal_code():
    """The per-frame kind and the loop every kind trains with import nothing from ``temporal``."""
    bad = [f"{a} -> {b} (line {line})" for a, b, line in _edges(_modules())
           if (a.startswith("affpipe.train") or a.startswith("affpipe.run.")) and b.startswith("affpipe.temporal")]
    assert not bad, "\n".join(bad)
