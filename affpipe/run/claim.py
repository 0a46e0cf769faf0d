"""The run folder: ``affpipe train``'s own (:mod:`affpipe.outdir`), shared with what evaluates it.

``RUN_OWNER`` names every file a run folder may hold — what ``train`` writes, and what
``evaluate`` and the tuning options add beside the checkpoint — so a run folder never holds, and
affpipe never replaces or deletes, a file of a user's. ``train`` claims the folder for the
run's life (:func:`claim_run`; one writer, its lock dropped by the kernel on kill -9): a
user's folder is refused, ``--resume`` continues only a run made from the same config and data,
``--overwrite`` deletes the run's own files and starts afresh.

A run folder of affpipe 0.2 has no marker: ``--resume`` takes it over when it holds only names
``RUN_OWNER`` writes and a ``last.pt`` that loads as an affpipe checkpoint (:func:`legacy_run`);
anything else without a marker is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from affpipe.lineage import fingerprint
from affpipe.outdir import MARKER, Claim, Owner, adopt, check_folder, claim, unmarked_and_only_own
from affpipe.shards.format import read_manifest, shards_fingerprint
from affpipe.run.checkpoint import RESUME_MUTABLE, load_checkpoint
from affpipe.run.config import TrainConfig, to_dict

log = logging.getLogger(__name__)

RUN_OWNER = Owner("train", (
    "config.json", "lineage.json", "metrics.jsonl", "curves.png",
    "last.pt", "best.pt", "step-*.pt",  # (+ their .tmp while written)
    "eval*.json", "eval*.md",  # evaluate: eval.*, eval_<split>.*, eval_smoothed.*
    "au_thresholds.json", "smoothing.json",  # evaluate --tune-au-thresholds / --tune-smoothing
    "eval_predictions.*", "eval*_predictions.*",  # per-frame predictions of an evaluation
    "events.out.tfevents.*",  # TensorBoard
))
# Config keys the marker leaves out: what may change on --resume, and the data paths (the data
# is recorded by fingerprint, so a run and its data moved together still resume).
_DATA_KEYS = ("shards", "features", "index", "out")


def data_fingerprint(cfg: TrainConfig) -> str:
    """A fingerprint of the data ``cfg`` trains on: the shards' (their index's fingerprint and every
    shard's sha256: ``shards_fingerprint``), or the feature
    table's manifest (its source, rows and width; not its timing)."""
    if cfg.features is not None:  # (affpipe.temporal reads the tables itself; train may not import it)
        prints = []
        for table in cfg.feature_tables:  # several when fused, in order
            path = Path(table) / "manifest.json"
            try:
                manifest = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: not a feature table's manifest ({exc}); write one with `affpipe embed`") from None
            if not isinstance(manifest, dict):
                raise ValueError(f"{path}: not a feature table's manifest (not a JSON object)")
            prints.append(fingerprint({k: v for k, v in manifest.items() if k != "throughput"}))
        return prints[0] if len(prints) == 1 else fingerprint(prints)
    return shards_fingerprint(read_manifest(cfg.shards, full=False))


def run_inputs(cfg: TrainConfig) -> dict[str, Any]:
    """What a run is made from, as the folder's marker records it: every config key that must
    match on ``--resume`` (flattened, ``model.arch``...) and the data's fingerprint."""
    flat: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for key, value in d.items():
            name = prefix + key
            if isinstance(value, dict):
                walk(value, name + ".")
            elif name not in RESUME_MUTABLE and name not in _DATA_KEYS:
                flat[name] = value

    if not cfg.is_temporal:  # as Trainer.build resolves it and config.json records it
        from dataclasses import replace

        from affpipe.models.model import resolve_input

        cfg = replace(cfg, model=resolve_input(cfg.model, cfg.image_size))
    walk(to_dict(cfg), "")
    return {**flat, "data": data_fingerprint(cfg)}


def legacy_run(out: Path) -> bool:
    """A run folder of affpipe 0.2: no marker, only names ``RUN_OWNER`` writes, and a ``last.pt``
    that loads as an affpipe checkpoint (tensors only, with its config)."""
    out = Path(out)
    if not unmarked_and_only_own(out, RUN_OWNER) or not (out / "last.pt").is_file():
        return False
    try:
        return isinstance(load_checkpoint(out / "last.pt").get("config"), dict)
    except (ValueError, KeyError, OSError):
        return False


def check_run_folder(out: Path) -> None:
    """Refuse ``out`` unless it is new, empty, ``train``'s (marked) or a 0.2 run
    (:func:`legacy_run`): what to call before reading or adding anything in a run folder."""
    if not legacy_run(out):
        check_folder(Path(out), RUN_OWNER)


@contextlib.contextmanager
def claim_run(cfg: TrainConfig, *, overwrite: bool = False) -> Iterator[Claim]:
    """Claim ``cfg.out`` for a run and hold its lock while the body (the training) runs.

    New or empty: a fresh run. Ours with a ``last.pt``: ``cfg.resume`` continues it when the
    config and data match (the config is checked key by key again against ``last.pt``), else one
    line suggests ``--resume``, a new folder or ``overwrite``. Ours without a ``last.pt`` (stopped
    before its first checkpoint): nothing to resume, its files are removed and the run starts.
    """
    out = cfg.out
    if out is None:
        raise ValueError("train: no run folder given (-o/--out)")
    if cfg.resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other (--overwrite deletes the run --resume continues)")
    if cfg.resume and not out.is_dir():
        raise FileNotFoundError(f"--resume: no run folder at {out}")
    legacy = legacy_run(out)
    if legacy and not cfg.resume:
        raise FileExistsError(f"{out} holds a run of an older affpipe (last.pt, no {MARKER}); pass --resume to "
                              "continue it, or choose another -o")
    if not cfg.resume and not overwrite and (out / "last.pt").is_file():
        check_folder(out, RUN_OWNER)  # a folder not ours is refused as such, not taken for a run
        raise FileExistsError(f"{out} already holds a run (last.pt); pass --resume to continue it, --overwrite to "
                              "start afresh (deletes only the run's files), or choose another -o")
    inputs = run_inputs(cfg)
    if legacy:
        adopt(out, RUN_OWNER, inputs)
    with claim(out, RUN_OWNER, inputs, overwrite=overwrite) as folder:
        if not folder.fresh and not (out / "last.pt").exists():
            n = folder.remove_own()  # its metrics.jsonl lines would else be mixed into this run's
            log.info("%s: a run stopped before its first checkpoint; removed its %d file(s), starting afresh", out, n)
            folder.fresh = True
        yield folder
