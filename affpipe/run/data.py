"""What a run trained on: ``RUN/lineage.json`` (through :mod:`affpipe.run.folder`), written when a
run starts and kept in every checkpoint (``state["lineage"]``), read by ``evaluate``/``predict``
to find and check its data. Each kind of run fills it (``RunKind.lineage``):

    {"kind": "frames" | "temporal" | ..., "table": "frames" | "mtl",
     "index": <path relative to RUN>, "index_fingerprint": str,
     "shards": <relative path> | null, "shards_fingerprint": str | null,
     "features": [<relative path>, ...] | null, "features_fingerprint": [str, ...] | null}

The rules here are the only ones: where a reader takes a run's data from (:func:`run_data_path`:
a flag wins, else the lineage's path resolved against RUN, else the config's path as typed),
which index fingerprint an input records (:func:`index_fingerprint_of`), and that a resumed
run trains on the data it started on (:func:`check_same_data`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from affpipe.lineage import check, resolve_path
from affpipe.run.folder import LINEAGE, RunFolder

_KEYS = ("kind", "table", "index", "index_fingerprint", "shards", "shards_fingerprint", "features",
         "features_fingerprint")


def lineage_record(kind: str, table: str, index: str, index_fingerprint: str | None, *,
                   shards: str | None = None, shards_fingerprint: str | None = None,
                   features: list[str] | None = None, features_fingerprint: list[str] | None = None,
                   **extra: Any) -> dict[str, Any]:
    """A lineage with every key a reader expects (``extra``: a kind's own keys)."""
    return {"kind": kind, "table": table, "index": index, "index_fingerprint": index_fingerprint,
            "shards": shards, "shards_fingerprint": shards_fingerprint, "features": features,
            "features_fingerprint": features_fingerprint, **extra}


def index_fingerprint_of(manifest: dict[str, Any], index: Path, table: str) -> str:
    """The label index an input (shards, a feature table) was made from: the fingerprint its
    manifest records, else (inputs from before fingerprints) the index's own."""
    from affpipe.index.build import index_fingerprint

    recorded = manifest.get("index_fingerprint")
    return recorded if isinstance(recorded, str) else index_fingerprint(index, table)


def lineage_of_run(run_dir: Path | str) -> dict[str, Any] | None:
    """``RUN/lineage.json`` (None for a run written before it existed); a damaged one is an
    error naming the file."""
    folder = RunFolder(run_dir)
    data = folder.read_lineage_raw()
    if data is None:
        return None
    if not isinstance(data.get("kind"), str) or not set(_KEYS) <= set(data):
        raise ValueError(f"{folder.lineage}: not a run lineage (expected the keys {', '.join(_KEYS)})")
    return data


def run_data_path(run_dir: Path | str, stored: str | None, override: Path | None = None,
                  typed: Path | str | None = None) -> Path | None:
    """Where a run's data is: ``override`` (a flag), else ``stored`` (from lineage.json) resolved
    against the run folder, else ``typed`` (the config's path, runs without lineage.json)."""
    if override is not None:
        return Path(override)
    if stored is not None:
        return resolve_path(run_dir, stored)
    return None if typed is None else Path(typed)


def run_data_paths(run_dir: Path | str, stored: list[str] | None, override: tuple[Path, ...] = (),
                   typed: tuple[Path, ...] = ()) -> tuple[Path, ...]:
    """:func:`run_data_path` for a list of inputs (fused feature tables)."""
    if override:
        return tuple(Path(p) for p in override)
    if stored:
        return tuple(resolve_path(run_dir, s) for s in stored)
    return tuple(Path(p) for p in typed)


def check_same_data(recorded: dict[str, Any], now: dict[str, Any], run_dir: Path | str) -> None:
    """A resumed run must train on the data it started on: one error naming both sides."""
    where = Path(run_dir) / LINEAGE
    for key, what in (("index_fingerprint", "the index"), ("shards_fingerprint", "the shards"),
                      ("features_fingerprint", "the feature tables")):
        a, b = (v if v is None or isinstance(v, str) else json.dumps(v) for v in (recorded.get(key), now.get(key)))
        check(what, a, b,
              f"the run {Path(run_dir)} ({where})", f"the data given now ({now.get(key.split('_')[0])})")


def write_lineage(run_dir: Path | str, lineage: dict[str, Any]) -> None:
    """``RUN/lineage.json``, atomically."""
    RunFolder(run_dir).write_lineage(lineage)
