"""What a run trained on: ``RUN/lineage.json``, written when a run starts and kept in every
checkpoint (``state["lineage"]``), read by ``evaluate``/``predict`` to find and check its data.

    {"kind": "frames" | "temporal", "table": "frames" | "mtl",
     "index": <path relative to RUN>, "index_fingerprint": str,
     "shards": <relative path> | null, "shards_fingerprint": str | null,
     "features": [<relative path>, ...] | null, "features_fingerprint": [str, ...] | null}

Paths are relative to the run folder, so a run moved together with its data still finds it.
Where a reader takes a run's data from (:func:`run_data_path`): a flag (``--shards``,
``--features``, ``--index``) wins, else the lineage's path resolved against RUN, else the
config's path as typed (runs written before lineage.json). Whatever was chosen is checked
against the recorded fingerprint (``affpipe.lineage.check``): one line naming both sides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from affpipe.io import atomic_write_text
from affpipe.lineage import check, rel_path, resolve_path

LINEAGE_FILE = "lineage.json"
KINDS = ("frames", "temporal")
_KEYS = ("kind", "table", "index", "index_fingerprint", "shards", "shards_fingerprint", "features",
         "features_fingerprint")


def frames_lineage(cfg, run: Path) -> dict[str, Any]:
    """The lineage of a per-frame run on ``cfg.shards`` (its index checked against the shards)."""
    from affpipe.index.build import index_fingerprint
    from affpipe.shards.format import checked_index, read_manifest, shards_fingerprint

    manifest = read_manifest(cfg.shards, full=False)
    table = manifest.get("table", "frames")
    index = checked_index(cfg.shards, manifest, cfg.index)
    return {"kind": "frames", "table": table, "index": rel_path(run, index),
            "index_fingerprint": manifest.get("index_fingerprint") or index_fingerprint(index, table),
            "shards": rel_path(run, cfg.shards), "shards_fingerprint": shards_fingerprint(manifest),
            "features": None, "features_fingerprint": None}


def lineage_of_run(run_dir: Path | str) -> dict[str, Any] | None:
    """``RUN/lineage.json`` (None for a run written before it existed); a damaged one is an
    error naming the file."""
    path = Path(run_dir) / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc}); rewrite it with `affpipe train --resume`") from None
    if not isinstance(data, dict) or data.get("kind") not in KINDS or not set(_KEYS) <= set(data):
        raise ValueError(f"{path}: not a run lineage (expected the keys {', '.join(_KEYS)})")
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


def check_same_data(recorded: dict[str, Any], now: dict[str, Any], run_dir: Path | str) -> None:
    """A resumed run must train on the data it started on: one error naming both sides."""
    where = Path(run_dir) / LINEAGE_FILE
    for key, what in (("index_fingerprint", "the index"), ("shards_fingerprint", "the shards"),
                      ("features_fingerprint", "the feature tables")):
        a, b = (v if v is None or isinstance(v, str) else json.dumps(v) for v in (recorded.get(key), now.get(key)))
        check(what, a, b,
              f"the run {Path(run_dir)} ({where})", f"the data given now ({now.get(key.split('_')[0])})")


def write_lineage(run_dir: Path | str, lineage: dict[str, Any]) -> None:
    """``RUN/lineage.json``, atomically."""
    atomic_write_text(Path(run_dir) / LINEAGE_FILE, json.dumps(lineage, indent=2, sort_keys=True) + "\n")
