"""The package layout's rules (ARCHITECTURE.md): stage packages import only from earlier stages
and the shared modules, and module-level imports form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import affpipe

ROOT = Path(affpipe.__file__).resolve().parent
# Pipeline order; the shared modules (level 0) may be imported by anyone.
LEVEL = {"labels": 0, "batch": 0, "dist": 0, "io": 0, "_optional": 0, "lineage": 0, "outdir": 0, "synth": 1, "index": 2, "shards": 3,
         "twin": 3.5, "loaders": 4, "train": 5, "temporal": 6, "experiments": 7, "bench": 8, "cli": 9,
         "__main__": 9, "__init__": 0}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = ["affpipe", *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, module_level_only: bool) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("affpipe"):
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("affpipe")]
    return found


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_top_level_name_has_a_level():
    names = {p.name.removesuffix(".py") for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert names <= set(LEVEL), names - set(LEVEL)


def test_no_upward_import_between_stages():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        mine = LEVEL[_stage(name)]
        for lineno, target in _imports(path, module_level_only=False):
            target = target if target in modules else target.rsplit(".", 1)[0]
            if target in modules:
                theirs = LEVEL[_stage(target)]
                if theirs > mine and _stage(target) != _stage(name):
                    bad.append(f"{path.relative_to(ROOT.parent)}:{lineno}: {name} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_at_module_level():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for _, target in _imports(path, module_level_only=True):
            if target in modules:
                targets.add(target)
            elif target.rsplit(".", 1)[0] in modules:
                targets.add(target.rsplit(".", 1)[0])
        # a package's submodule importing its own package's __init__ is how Python loads it
        graph[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*stack, node]):
                return True
        state[node] = 2
        return False

    for name in sorted(graph):
        if state.get(name) is None and visit(name, []):
            break
    assert not cycle, " -> ".join(cycle)
