"""The run folder: ``affpipe train``'s own (:mod:`affpipe.outdir`), shared with what evaluates it.

``RUN_OWNER`` names every file a run folder may hold — what ``train`` writes, and what
``evaluate`` and the tuning options add beside the checkpoint — so a run folder never holds, and
affpipe never replaces or deletes, a file of a user's. ``train`` claims the folder for the
run's life (:func:`claim_run`; one writer, its lock dropped by the kernel on kill -9): a
user's folder is refused, ``--resume`` continues only a run made from the same config and data,
``--overwrite`` deletes the run's own files and starts afresh.

Nothing a run produced (``RESULTS``: checkpoints, evaluations, predictions, tuned state) is
deleted without ``--overwrite``. A folder whose ``last.pt`` is gone (removed to save space) is a
finished or resumable run, never an empty one: ``train`` refuses it, ``--resume`` continues from
``best.pt`` only when that is the run's latest checkpoint (:func:`check_resume_from_best`). Only a
folder that holds nothing but the log of a run that never reached a step is reused as it is
(whatever its config: another ``--batch-size`` after a failed start needs no ``--overwrite``).

A run folder of affpipe 0.2 has no marker: ``--resume`` takes it over when it holds only names
``RUN_OWNER`` writes, a ``last.pt`` that loads as an affpipe checkpoint (:func:`legacy_run`) and
that checkpoint was made from the config and data given now (:func:`check_legacy_inputs`);
anything else without a marker is refused.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from affpipe.lineage import fingerprint
from affpipe.outdir import MARKER, Claim, adopt, check_folder, claim, unmarked_and_only_own
from affpipe.run.checkpoint import RESUME_MUTABLE, config_differences, load_checkpoint
from affpipe.run.config import DATA_KEYS, TrainConfig, flat_config, to_dict
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
    flat = flat_config(cfg, lambda name: name in RESUME_MUTABLE or name in _DATA_KEYS)
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


def _lineage_data(rec: dict[str, Any] | None) -> str | None:
    """The data fingerprint a run's lineage records, as ``RunKind.data_fingerprint`` computes it
    now: the shards' fingerprint, else the feature table's (several: their fingerprint)."""
    if not isinstance(rec, dict):
        return None
    if isinstance(rec.get("shards_fingerprint"), str):
        return rec["shards_fingerprint"]
    prints = rec.get("features_fingerprint")
    if isinstance(prints, list) and prints:
        return prints[0] if len(prints) == 1 else fingerprint(prints)
    return None


def check_legacy_inputs(out: Path, cfg: TrainConfig, kind: RunKind, data: str) -> None:
    """Before a 0.2 run folder is adopted: its ``last.pt`` must have been trained with ``cfg``
    (every key ``--resume`` may not change) on the data given now (its lineage's fingerprint, or
    without one the data paths its config names); else one error naming both sides."""
    from affpipe.run.data import lineage_of_run

    last = RunFolder(out).last
    ckpt = load_checkpoint(last)
    rec = ckpt.get("lineage") if isinstance(ckpt.get("lineage"), dict) else lineage_of_run(out)
    recorded = _lineage_data(rec)
    diffs = config_differences(ckpt["config"], to_dict(cfg))
    if recorded is not None:  # the data is compared by content; its paths may have moved
        diffs = [d for d in diffs if d.split(":")[0] not in (*DATA_KEYS, "out")]
        if recorded != data and not kind.accepts_recorded(cfg, recorded):
            diffs.append(f"data: {recorded!r} (its lineage) != {data!r} (now)")
    if diffs:
        raise FileExistsError(f"{out}: a run of an older affpipe (no {MARKER}) whose {last.name} was made from other "
                              f"inputs than given now ({'; '.join(diffs)}); not adopted: resume it with the config "
                              "and data it was trained with, or choose another -o")


def check_run_folder(out: Path) -> None:
    """Refuse ``out`` unless it is new, empty, ``train``'s (marked) or a 0.2 run
    (:func:`legacy_run`): what to call before reading or adding anything in a run folder."""
    if not legacy_run(out):
        check_folder(Path(out), RUN_OWNER)


def reusable(out: Path) -> bool:
    """Whether ``out`` holds nothing a run produced and its log no step: a run that failed
    before its first step, whose folder a new run may take whatever its config."""
    files = RunFolder(out)
    return not files.results() and not files.logged_steps()


def check_resume_from_best(out: Path, cfg: TrainConfig) -> None:
    """``--resume`` in a folder with ``best.pt`` but no ``last.pt`` (removed to save space).

    ``best.pt`` is written beside ``last.pt`` at the end of an improving epoch, from the same
    state: when no checkpoint was written after it (no later epoch line in ``metrics.jsonl``,
    nor a ``ckpt_every`` step, but one whose write a kill may have cut short), it *is* the
    state ``last.pt`` held (or, for a run killed before its first ``last.pt`` landed, the newest
    state there is), and resuming from it redoes only what resuming from ``last.pt`` would. Otherwise continuing from it would drop epochs the
    log and ``eval.json`` describe: refused. A finished run (its epochs done) is refused too,
    saying so: nothing to resume."""
    files = RunFolder(out)
    try:
        best = load_checkpoint(files.best)
        step, epoch = int(best["step"]), int(best["epoch"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--resume: {out} has no last.pt and its best.pt is unreadable ({exc}); nothing "
                         "to resume from") from None
    records = files.read_metrics()
    every = cfg.ckpt_every

    def checkpointed(r: dict[str, Any]) -> bool:
        s = int(r.get("step", 0))
        return s > step and (r.get("kind") == "epoch" or bool(every and r.get("kind") == "train" and s % every == 0))

    # A checkpoint's log line is written just before its last.pt: a run that did not finish (no
    # eval.json) may have been killed in that write, so its newest such line proves nothing landed.
    marks = [int(r.get("step", 0)) for r in records if checkpointed(r)]
    later = marks if files.has_eval() else marks[:-1]
    advice = "evaluate best.pt as it is, or start afresh with --overwrite (deletes only the run's files) or another -o"
    if not records or later:
        why = (f"its last checkpoint was at step {max(later)} (metrics.jsonl)" if later
               else "no metrics.jsonl shows it is the run's latest state")
        raise FileExistsError(f"--resume: {out} has no last.pt, and its best.pt (step {step}) is not the state to "
                              f"continue: {why}; {advice}")
    if epoch >= cfg.epochs:
        raise FileExistsError(f"--resume: {out} is finished (best.pt holds its last state: epoch {epoch} of "
                              f"{cfg.epochs}; last.pt was removed): nothing to resume; pass a larger --epochs to "
                              "train on from best.pt, or evaluate it as it is")
    log.warning("%s: no last.pt; best.pt (step %d) is the run's latest checkpoint: resuming from it", out, step)


@contextlib.contextmanager
def claim_run(cfg: TrainConfig, kind: RunKind, *, overwrite: bool = False) -> Iterator[Claim]:
    """Claim ``cfg.out`` for a run and hold its lock while the body (the training) runs.

    New or empty: a fresh run. Ours with results (see the module docstring): ``cfg.resume``
    continues it from ``last.pt`` (or a ``best.pt`` that is its latest state) when the config and
    data match (checked key by key again against the checkpoint), else one line suggests
    ``--resume``, a new folder or ``overwrite``. Ours with only the log of a run that never
    reached a step: reused, whatever its config. Ours with the log of steps but no checkpoint:
    nothing to resume, refused (``overwrite`` starts afresh).
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
    files = RunFolder(out)
    if not legacy:
        check_folder(out, RUN_OWNER)  # a folder not ours is refused as such, not taken for a run
    results = files.results()
    if not overwrite:
        if results and not cfg.resume:
            held = files.last.name if files.last.is_file() else f"{', '.join(results)}; no {files.last.name}"
            raise FileExistsError(f"{out} already holds a run ({held}); pass --resume to continue it, --overwrite to "
                                  "start afresh (deletes only the run's files), or choose another -o")
        if cfg.resume and results and not files.last.is_file():
            if not files.best.is_file():
                raise FileExistsError(f"--resume: {out} holds {', '.join(results)} but no last.pt or best.pt: "
                                      "nothing to resume from; pass --overwrite to start afresh (deletes only the "
                                      "run's files) or choose another -o")
            check_resume_from_best(out, cfg)
        if not results and (steps := files.logged_steps()):
            raise FileExistsError(f"{out}: a run stopped at step {steps} before its first checkpoint (metrics.jsonl, "
                                  "no last.pt): nothing to resume; pass --overwrite to start afresh (deletes only "
                                  "the run's files) or choose another -o")
    data = kind.data_fingerprint(cfg)
    recorded = _recorded_data(out)
    if recorded is not None and recorded != data and kind.accepts_recorded(cfg, recorded):
        data = recorded  # the same data, fingerprinted as an older affpipe did
    inputs = run_inputs(cfg, data)
    if legacy:
        check_legacy_inputs(out, cfg, kind, data)
        adopt(out, RUN_OWNER, inputs)
    with claim(out, RUN_OWNER, inputs, overwrite=overwrite, reuse=reusable) as folder:
        yield folder
