"""What a run trained on: ``RUN/lineage.json`` (written at the start of a run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LINEAGE_FILE = "lineage.json"


def lineage_of_run(run_dir: Path) -> dict[str, Any] | None:
    """``run_dir/lineage.json`` (paths in it are relative to ``run_dir``); None for a run without one."""
    path = Path(run_dir) / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict) or data.get("kind") not in ("frames", "temporal"):
        raise ValueError(f"{path}: not a run's lineage file")
    return data
