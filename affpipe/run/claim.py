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
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from affpipe.outdir import MARKER, Claim, adopt, check_folder, claim, unmarked_and_only_own
from affpipe.run.checkpoint import RESUME_MUTABLE, load_checkpoint
from affpipe.run.config import DATA_KEYS, TrainConfig, to_dict
from affpipe.run.folder import RUN_OWNER, RunFolder
from affpipe.run.kind import RunKind

log = logging.getLogger(__name__)

# Config keys the marker leaves out: what may change on --resume, and the data paths (the data
# is recorded by fingerprint, so a run and its data moved together still resume).
_DATA_KEYS = (*DATA_KEYS, "out")


def run_inputs(cfg: TrainConfig, data_fingerprint: str) -> dict[str, Any]:
    """What a run is made from, as the folder's marker records it: every config key that must
    match on ``--resume`` (flattened, ``model.arch``...; ``cfg`` as its kind resolved it) and the
    fingerprint of its data (the kind's: ``RunKind.data_fingerprint``)."""
    flat: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for key, value in d.items():
            name = prefix + key
            if isinstance(value, dict):
                walk(value, name + ".")
            elif name not in RESUME_MUTABLE and name not in _DATA_KEYS:
                flat[name] = value

    walk(to_dict(cfg), "")
    return {**flat, "data": data_fingerprint}


def _recorded_data(out: Path) -> str | None:
    """The data fingerprint the folder's marker records (None: no marker)."""
    from affpipe.outdir import read_marker

    marker = read_marker(Path(out))
    value = ((marker or {}).get("inputs") or {}).get("data")
    return value if isinstance(value, str) else None


def legacy_run(out: Path) -> bool:
    """A run folder of affpipe 0.2: no marker, only names ``RUN_OWNER`` writes, and a ``last.pt``
    that loads as an affpipe checkpoint (tensors only, with its config)."""
    out = Path(out)
    if not unmarked_and_only_own(out, RUN_OWNER) or not RunFolder(out).last.is_file():
        return False
    try:
        return isinstance(load_checkpoint(RunFolder(out).last).get("config"), dict)
    except (ValueError, KeyError, OSError):
        return False


def check_run_folder(out: Path) -> None:
    """Refuse ``out`` unless it is new, empty, ``train``'s (marked) or a 0.2 run
    (:func:`legacy_run`): what to call before reading or adding anything in a run folder."""
    if not legacy_run(out):
        check_folder(Path(out), RUN_OWNER)


@contextlib.contextmanager
def claim_run(cfg: TrainConfig, kind: RunKind, *, overwrite: bool = False) -> Iterator[Claim]:
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
    folder_files = RunFolder(out)
    if not cfg.resume and not overwrite and folder_files.last.is_file():
        check_folder(out, RUN_OWNER)  # a folder not ours is refused as such, not taken for a run
        raise FileExistsError(f"{out} already holds a run (last.pt); pass --resume to continue it, --overwrite to "
                              "start afresh (deletes only the run's files), or choose another -o")
    data = kind.data_fingerprint(cfg)
    recorded = _recorded_data(out)
    if recorded is not None and recorded != data and kind.accepts_recorded(cfg, recorded):
        data = recorded  # the same data, fingerprinted as an older affpipe did
    inputs = run_inputs(cfg, data)
    if legacy:
        adopt(out, RUN_OWNER, inputs)
    with claim(out, RUN_OWNER, inputs, overwrite=overwrite) as folder:
        if not folder.fresh and not folder_files.last.exists():
            n = folder.remove_own()  # its metrics.jsonl lines would else be mixed into this run's
            log.info("%s: a run stopped before its first checkpoint; removed its %d file(s), starting afresh", out, n)
            folder.fresh = True
        yield folder
