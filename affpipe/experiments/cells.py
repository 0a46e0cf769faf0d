"""What ``affpipe experiments`` keeps about its folder: the names it owns and each cell's config.

``experiments_owner`` lists, name by name, what the grid writes into its folder (its state and
report, the data it prepares, a feature table per ``features_from`` run, each cell's run folder
for every seed); ``cell_inputs`` is a cell's resolved config (recipe + grid + ``--set``, through
``affpipe.run.config``), recorded with its fingerprint in ``experiments.json`` when the cell
trains, so that a later call tells a cell's folder trained from another config (:func:`changed`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from affpipe.lineage import fingerprint
from affpipe.outdir import LOCK, MARKER, Owner, input_differences, read_marker
from affpipe.run.folder import RUN_OWNER

STATE = "experiments.json"
# What `affpipe experiments` writes at its folder's top: its state and the report (figures).
_TOP = (STATE, "report.md", "report.json", "*.png")
# The data it prepares (affpipe.twin: the twin's tree, the index, the shards and the cache stamp).
_DATA = ("data/cache.json", "data/tree/**", "data/index/**", "data/shards/**")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # (grid.py checks the grid's names the same way)


def seeded(name: str, seed: int) -> str:
    """The run folder name of grid run ``name`` trained with ``seed`` (seed 0 keeps the plain name)."""
    return name if seed == 0 else f"{name}-seed{seed}"


def experiments_owner(grid: Any, seeds: int, out: Path) -> Owner:
    """What ``experiments`` writes into ``out`` for ``grid`` (a ``grid.Grid``), name by name: its state and report, the data it
    prepares, a feature table per ``features_from`` run and each cell's run folder (the names a
    run folder holds, ``RUN_OWNER``) for every seed, this time's and those its state records."""
    state = read_state(out)
    every = range(max(seeds, int(state.get("seeds", 1) or 1)))
    names = {seeded(r.name, k) for r in grid.runs for k in every} | set(state.get("cells", {}))
    sources = {seeded(r.features_from, k) for r in grid.runs if r.features_from for k in every}
    run_names = (*RUN_OWNER.patterns, MARKER, LOCK)
    patterns = [*_TOP, *_DATA, *(f"data/features/{s}/**" for s in sorted(sources) if _NAME_OK.match(s)),
                *(f"runs/{n}/{p}" for n in sorted(names) if _NAME_OK.match(n) for p in run_names)]
    return Owner("experiments", tuple(patterns))


def read_state(out: Path) -> dict[str, Any]:
    """``experiments.json`` of a folder experiments marked ({} when there is none or it is not ours)."""
    path = Path(out) / STATE
    try:
        marker = read_marker(Path(out))
        if (marker or {}).get("command") != "experiments" or not path.is_file() or path.is_symlink():
            return {}
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and isinstance(state.get("cells", {}), dict) else {}


# Keys of a resolved config that do not change what a cell trains (where it runs from, its log,
# loader worker processes) or that the folder's inputs already fix (its data paths).
_CELL_IGNORED = ("resume", "out", "shards", "features", "index", "loader.num_workers", "loader.backend")


def cell_inputs(recipe: Path, overrides: Mapping[str, Any], runs_dir: Path) -> dict[str, Any]:
    """What a cell is trained from: its recipe resolved with every override (the grid's cell and
    synthetic keys, ``--set``, seed, init) through :func:`affpipe.run.config.load_config`,
    flattened; a backbone from another cell is named relative to ``runs_dir``."""
    from affpipe.run.config import flat_config, load_config

    flat = flat_config(load_config(recipe, dict(overrides)),
                       lambda name: name in _CELL_IGNORED or name.startswith("logging."))
    init = flat.get("model.init")
    if isinstance(init, str) and Path(init).is_relative_to(runs_dir):
        flat["model.init"] = Path(init).relative_to(runs_dir).as_posix()
    return flat


def save_state(out: Path, state: dict[str, Any]) -> None:
    """``experiments.json``: the statuses of this call, and every cell's resolved config (kept
    across calls: what its run folder was trained from)."""
    from affpipe.io import atomic_write_text

    atomic_write_text(Path(out) / STATE, json.dumps(state, indent=2, default=str) + "\n")


def changed(name: str, recorded: Mapping[str, Any] | None, now: Mapping[str, Any]) -> str | None:
    """Why the cell's folder cannot stand for its config now (None: the same, or never recorded)."""
    if not isinstance(recorded, Mapping) or not isinstance(recorded.get("inputs"), Mapping):
        return None
    if recorded.get("fingerprint") == fingerprint(dict(now)):
        return None
    diffs = input_differences(recorded["inputs"], now)
    more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
    return (f"`{name}` was trained from another config ({'; '.join(diffs[:4])}{more}); rerun with the grid and "
            "--set it was trained with, or pass --overwrite (deletes only experiments' files) or choose another -o")
