"""``affpipe train``: one entry for every kind of run, dispatched through the registry."""

from __future__ import annotations

from pathlib import Path

from affpipe.run.config import TrainConfig
from affpipe.runs.kinds import kind_of


def train(cfg: TrainConfig, *, overwrite: bool = False) -> Path:
    """Train ``cfg`` into the run folder ``cfg.out`` as its kind does (per-frame on shards, a
    temporal head on feature tables); returns the folder. ``overwrite``: start afresh in a folder
    holding a run (its files deleted)."""
    from affpipe.train.loop import train as run_loop

    return run_loop(cfg, kind_of(cfg), overwrite=overwrite)
