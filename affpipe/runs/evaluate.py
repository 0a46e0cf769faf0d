"""``affpipe evaluate``: one function for every kind of run (per-frame, smoothed, temporal).

``evaluate(EvalConfig)`` opens the run once (``open_run``), runs its model over a split
(``collect``), optionally smooths the predictions per video (``apply_smoothing``) and hands the
filled ``MetricAccumulator`` with the video of each row to the one reporting function,
``affpipe.train.evaluate.report_evaluation``. It writes only its own files (``eval*.json``,
``eval*.md``, ``au_thresholds.json``, ``smoothing.json``) into the run folder, and only into a
folder that is a run folder: one ``affpipe train`` wrote (its marker), or, for runs and bare
checkpoints without a marker, a folder holding nothing but names a run folder holds (a
checkpoint lying among a user's files is refused, never written beside). Non-finite model
outputs stop it with one error naming the run, the data and how many rows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from affpipe.loaders.base import LoaderConfig
from affpipe.runs.open import Run, RunInputs, open_run
from affpipe.scoring.metrics import MetricAccumulator

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EvalConfig(RunInputs):
    """What ``evaluate`` does (``RunInputs``: the run and its data overrides)."""

    split: str = "val"
    tune_au_thresholds: bool = False
    smooth: bool = False  # the windows of smoothing.json
    tune_smoothing: bool = False  # pick them on this split, store them, apply them
    tune_folds: int | None = None  # also score the tuning cross-validated over this many folds of videos

    def __post_init__(self) -> None:
        if self.tune_folds is not None and not (self.tune_au_thresholds or self.tune_smoothing):
            raise ValueError("--tune-folds scores tuning: give --tune-au-thresholds or --tune-smoothing with it")
    batch_size: int | None = None
    device: str = "auto"
    loader: LoaderConfig | None = None  # None: the run's own loader settings
    max_steps: int | None = None
    write: bool = True  # eval*.json/md (and tuned files) into the run folder


@dataclass
class Collected:
    """A run's predictions over one split: the accumulator, the video and frame of each of its
    rows, frames seen and bad samples skipped (by reason)."""

    acc: MetricAccumulator
    frames: int
    video: np.ndarray
    frame: np.ndarray
    skipped: dict[str, int]


def collect(run: Run, split: str, *, device: str = "auto", batch_size: int | None = None,
            loader: LoaderConfig | None = None, max_steps: int | None = None) -> Collected:
    """Run ``run``'s model over ``split`` of its data; refuses non-finite outputs."""
    from affpipe.dist import pick_device
    from affpipe.train.evaluate import evaluate_model, limited_batches

    dev = pick_device(device)
    model = run.model(dev)
    batches = run.batches(split, dev, batch_size=batch_size, loader=loader)
    # --max-steps scores batches that hold every video of the split, as training's --max-val-steps
    only = limited_batches(batches, max_steps, lambda rows: run.frames_of(rows)[0], flag="--max-steps")
    acc, frames = evaluate_model(model, batches, run.cfg.heads, device=dev, amp=run.cfg.amp, max_steps=max_steps,
                                 only=only)
    video, frame = run.frames_of(acc.state()["row_id"])
    bad = acc.nonfinite_rows()
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{run.ckpt}: the model's outputs are not finite (NaN/Inf) for {int(bad.sum())} of "
                         f"{len(bad)} rows of split {split!r} of {run.source} (first: {video[first]}/"
                         f"{int(frame[first]):05d}.jpg); nothing written")
    return Collected(acc, frames, video, frame, dict(getattr(batches, "skipped", {}) or {}))


def apply_smoothing(run: Run, c: Collected, split: str, *, smooth: bool, tune_smoothing: bool,
                    write: bool) -> dict[str, Any]:
    """Smooth ``c.acc`` in place (windows tuned on ``split``, or those of ``smoothing.json``);
    returns the result's ``smoothing`` entry (windows, where they were tuned, unsmoothed scores), or {}."""
    from affpipe.io import jsonable
    from affpipe.temporal import smoothing as sm

    if not (smooth or tune_smoothing):
        return {}
    info: dict[str, Any] = {}
    if tune_smoothing:
        windows, scores = sm.tune(c.acc, c.video, c.frame, au_thresholds=run.au_thresholds())
        info.update(tuned_on=split, scores=scores)
        if write:
            sm.save_windows(run.folder, windows, split=split, checkpoint=run.ckpt.name, scores=scores,
                            step=int(run.state.get("step", 0)))
    else:
        run.check_tuned(run.files.read_smoothing(), run.files.smoothing)
        windows, info["tuned_on"] = sm.load_windows(run.folder, with_split=True)
    before = c.acc.compute()
    info["unsmoothed"] = {k: before[k] for k in ("va_ccc", "expr_f1", "au_f1", "p_mtl") if k in before}
    c.acc = sm.smooth(c.acc, c.video, c.frame, windows)
    info["windows"] = {t: w for t, w in windows.items() if t in run.cfg.heads}
    return {"smoothing": jsonable(info)}


def thresholds_tuned_on(run: Run) -> str | None:
    """The split the run folder's ``au_thresholds.json`` was tuned on (None: no such file)."""
    try:
        saved = run.files.read_thresholds()
    except ValueError:
        return None
    return None if saved is None else str(saved.get("split"))


def nested_cross_validated(run: Run, c: Collected, raw: MetricAccumulator, smoothing: dict[str, Any] | None,
                           cfg: EvalConfig) -> dict[str, Any]:
    """The ``cross_validated`` entry: every step tuned on ``cfg.split`` (smoothing windows, AU
    thresholds, whether tuned now or read from a file tuned on this split) is tuned again on the
    other folds' recordings only; steps tuned elsewhere are applied as they are."""
    from affpipe.temporal import smoothing as sm

    file_thr_here = thresholds_tuned_on(run) == cfg.split
    tune_thr = "au" in run.cfg.heads and (cfg.tune_au_thresholds or file_thr_here)
    tune_win = bool(smoothing) and smoothing.get("tuned_on") == cfg.split
    base = raw if tune_win or not smoothing else c.acc  # windows tuned elsewhere: applied as they are
    fixed = None if tune_thr else run.au_thresholds()
    return sm.cross_validated_result(base, c.video, c.frame, cfg.tune_folds, au_thresholds=fixed,
                                     smoothing=tune_win, tune_thresholds=tune_thr)


@contextlib.contextmanager
def run_folder_for_writing(folder: Path, checkpoint: str | None = None) -> Iterator[None]:
    """Hold ``folder``'s lock while evaluate writes into it, after checking it is a run folder
    (see the module docstring; ``checkpoint``: the evaluated file's name, a run file whatever
    it is called); refuses a folder holding anything else, or any symlink."""
    from affpipe.outdir import LOCK, check_folder, folder_lock, read_marker, walk
    from affpipe.run.claim import RUN_OWNER

    folder = Path(folder)
    if read_marker(folder) is not None:
        check_folder(folder, RUN_OWNER)
    else:
        foreign = [f"{rel} ({kind})" if kind != "file" else rel for rel, kind in walk(folder)
                   if kind != "file" or not (RUN_OWNER.owns(rel) or rel == checkpoint)]
        if foreign:
            more = ", ..." if len(foreign) > 8 else ""
            raise FileExistsError(f"{folder}: not a run folder (holds {', '.join(foreign[:8])}{more}); evaluate "
                                  "writes eval.json beside the checkpoint: move it into a folder of its own")
    with folder_lock(folder, LOCK, "affpipe train/evaluate"):
        yield


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.run`` (its best.pt, or a checkpoint) on ``cfg.split`` of its data.

    Writes ``eval.json``/``eval.md`` (``eval_<split>.*`` for another split) into the run folder.
    With ``tune_au_thresholds`` the per-AU thresholds maximizing F1 on this split are stored in
    ``au_thresholds.json`` (``predict`` uses them) and both the 0.5 and the tuned figures are
    reported; with ``tune_smoothing`` the per-task smoothing windows go to ``smoothing.json``.
    Figures tuned on the split they are reported on are optimistic (the report says so).
    """
    from affpipe.train.evaluate import report_evaluation

    run = open_run(cfg)
    if cfg.tune_au_thresholds and "au" not in run.cfg.heads:
        raise ValueError(f"--tune-au-thresholds: {run.ckpt} has no AU head (task {run.cfg.task})")
    guard = run_folder_for_writing(run.folder, run.ckpt.name) if cfg.write else contextlib.nullcontext()
    with guard:
        c = collect(run, cfg.split, device=cfg.device, batch_size=cfg.batch_size, loader=cfg.loader,
                    max_steps=cfg.max_steps)
        raw = c.acc
        extra = apply_smoothing(run, c, cfg.split, smooth=cfg.smooth, tune_smoothing=cfg.tune_smoothing,
                                write=cfg.write)
        if cfg.tune_folds:
            cv = nested_cross_validated(run, c, raw, extra.get("smoothing"), cfg)
            (extra["smoothing"] if "smoothing" in extra else extra)["cross_validated"] = cv
        extra["skipped"] = c.skipped  # bad samples skipped (--on-bad skip), by reason
        return report_evaluation(c.acc, c.frames, run.cfg, run.ckpt, run.state, cfg.split,
                                 tune_au_thresholds=cfg.tune_au_thresholds, write=cfg.write, extra=extra,
                                 videos=c.video, start_is_candidate=run.kind.start_is_candidate)


def smoothed_evaluation(run: Run, folds: int) -> dict[str, Any]:
    """``eval_smoothed.json``: ``run``'s validation predictions (the ones its evaluation kept: no
    second pass of the model) smoothed per video with windows tuned on validation, with
    intervals, and the score of smoothing cross-validated over ``folds`` folds of videos."""
    from affpipe.run.folder import eval_stem
    from affpipe.scoring.bootstrap import evaluation_intervals, load_predictions
    from affpipe.temporal.smoothing import tune_cross_validated
    from affpipe.train.evaluate import report_evaluation, write_eval

    files = run.files
    stem, cv_stem = eval_stem(smoothed=True), eval_stem(smoothed=True, cross_validated=True)
    arrays, _ = load_predictions(files.predictions())
    acc = MetricAccumulator.from_state(run.cfg.heads, arrays)
    video, frame = run.frames_of(arrays["row_id"])
    c = Collected(acc, len(arrays["row_id"]), video, frame, {})
    with run_folder_for_writing(run.folder):
        cv = tune_cross_validated(c.acc, video, frame, folds)
        extra = apply_smoothing(run, c, "val", smooth=False, tune_smoothing=True, write=True)
        result = report_evaluation(c.acc, c.frames, run.cfg, run.ckpt, run.state, "val", write=False, extra=extra,
                                   start_is_candidate=run.kind.start_is_candidate)
        result.update(evaluation_intervals(c.acc, video, files.predictions(stem)))
        result["note"] = "smoothing windows tuned on this split (val): optimistic, as tuned AU thresholds are"
        keys = ("va_ccc", "valence_ccc", "arousal_ccc", "expr_f1", "au_f1", "p_mtl")
        result["cross_validated"] = {**{k: v for k, v in cv["scores"].items() if k in keys}, "folds": folds,
                                     "fold_windows": cv["fold_windows"],
                                     **evaluation_intervals(cv["acc"], video, files.predictions(cv_stem))}
        write_eval(run.folder, result, stem=stem)
    return result
