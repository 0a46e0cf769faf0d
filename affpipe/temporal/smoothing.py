"""Per-video temporal smoothing of per-frame predictions, with the window tuned on validation.

A centred moving average over frame numbers: frame ``f``'s smoothed value is the mean of the
predictions of its video's frames in ``[f - w//2, f + w//2]`` that have one (frames without a
crop are simply absent: the window is measured in frames, not rows). VA is smoothed as values,
EXPR and AU as probabilities, before argmax / threshold. Window 1 is the identity and always a
tuning candidate, so tuned smoothing never scores below no smoothing on the tuning split.

Works on a filled ``MetricAccumulator`` (per-frame and temporal runs alike); the tuned windows
are stored as ``smoothing.json`` beside the checkpoint, as the AU thresholds are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from affpipe.run.folder import RunFolder
from affpipe.scoring.metrics import MetricAccumulator, au_f1, expr_f1, va_ccc

log = logging.getLogger(__name__)

WINDOW_GRID: tuple[int, ...] = (1, 3, 5, 9, 15, 25, 41, 61, 91)
SMOOTHED = {"va": "va_pred", "expr": "expr_prob", "au": "au_prob"}  # task → the stored array it smooths


def moving_average(values: np.ndarray, video: np.ndarray, frame: np.ndarray, window: int) -> np.ndarray:
    """Centred per-video moving average of ``values [N, C]`` over frame numbers (rows in any order)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"smoothing window must be a positive odd number of frames, got {window}")
    values = np.asarray(values, np.float64)
    if window == 1 or len(values) == 0:
        return values.astype(np.float32)
    codes = np.unique(np.asarray(video), return_inverse=True)[1].astype(np.int64)
    key = codes << 32 | np.asarray(frame, np.int64)
    order = np.argsort(key, kind="stable")
    k = key[order]
    half = window // 2
    # The video code sits in the high bits, so a search never crosses into another video.
    lo = np.searchsorted(k, k - half, side="left")
    hi = np.searchsorted(k, k + half, side="right")
    csum = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(values[order], axis=0)])
    out = np.empty_like(values)
    out[order] = (csum[hi] - csum[lo]) / (hi - lo)[:, None]
    return out.astype(np.float32)


def smooth(acc: MetricAccumulator, video: np.ndarray, frame: np.ndarray, windows: Mapping[str, int]) -> MetricAccumulator:
    """A copy of ``acc`` with each task's predictions smoothed by its window (absent tasks skipped).

    ``video``/``frame`` belong to ``acc``'s rows, in its order (``frames_of``).
    """
    state = acc.state()
    new = {SMOOTHED[t]: moving_average(state[SMOOTHED[t]], video, frame, int(w))
           for t, w in windows.items() if t in acc.tasks and int(w) > 1}
    return acc.with_predictions(**new) if new else acc


def _scorers(acc: MetricAccumulator, au_thresholds: Sequence[float] | None) -> dict[str, Any]:
    a = acc.state()
    thr = np.full(a["au_prob"].shape[1], 0.5) if au_thresholds is None or "au_prob" not in a else np.asarray(au_thresholds)
    fns = {
        "va": lambda p: va_ccc(p[a["va_mask"]], a["va_target"][a["va_mask"]])["va_ccc"],
        "expr": lambda p: expr_f1(p.argmax(1)[a["expr_mask"]], a["expr_target"][a["expr_mask"]])[0],
        "au": lambda p: au_f1(p >= thr, a["au_target"], a["au_mask"])[0],
    }
    return {t: fns[t] for t in acc.tasks}


def tune(acc: MetricAccumulator, video: np.ndarray, frame: np.ndarray, *, grid: Sequence[int] = WINDOW_GRID,
         au_thresholds: Sequence[float] | None = None) -> tuple[dict[str, int], dict[str, dict[int, float]]]:
    """Per task, the window of ``grid`` (plus 1) maximizing that task's metric on ``acc``'s labels.

    Ties go to the smaller window. Returns the windows and every candidate's score.
    """
    state = acc.state()
    chosen: dict[str, int] = {}
    scores: dict[str, dict[int, float]] = {}
    for task, fn in _scorers(acc, au_thresholds).items():
        cands = sorted({1, *(int(w) for w in grid)})
        scores[task] = {w: float(fn(moving_average(state[SMOOTHED[task]], video, frame, w))) for w in cands}
        finite = {w: s for w, s in scores[task].items() if np.isfinite(s)}
        chosen[task] = max(finite, key=lambda w: (finite[w], -w)) if finite else 1
    return chosen, scores


def tune_cross_validated(acc: MetricAccumulator, video: np.ndarray, frame: np.ndarray, folds: int = 2, *,
                         seed: int = 0, grid: Sequence[int] = WINDOW_GRID,
                         au_thresholds: Sequence[float] | None = None, smoothing: bool = True,
                         tune_thresholds: bool = False) -> dict[str, Any]:
    """Nested cross-validation over recordings of every tuned step: per fold, on the other folds'
    recordings only, (with ``tune_thresholds``) AU thresholds are tuned on the raw predictions,
    (with ``smoothing``) windows are tuned at those thresholds, and the thresholds are tuned again
    on the smoothed predictions; the held-out fold is smoothed with those windows and binarized
    with those thresholds. Nothing tuned on a held-out recording ever touches its own score.
    ``au_thresholds`` are fixed thresholds (not tuned on this split) used when ``tune_thresholds``
    is off. The held-out predictions of all folds are scored together: ``scores``, ``folds``,
    ``fold_windows``, ``fold_thresholds``, ``tuned`` (the steps) and ``acc`` (held-out
    predictions; AU as 0/1 at 0.5 when thresholds were tuned)."""
    from affpipe.scoring.metrics import video_folds

    fold = video_folds(video, folds, seed=seed, n_rows=len(acc))
    state = acc.state()
    new = {SMOOTHED[t]: state[SMOOTHED[t]].astype(np.float32) for t in acc.tasks}
    has_au = "au" in acc.tasks
    fixed = np.full(12, 0.5) if au_thresholds is None else np.asarray(au_thresholds, np.float64)
    per_fold, per_thr = [], []
    for k in range(folds):
        held, train = fold == k, fold != k
        sub, thr = acc.subset(train), fixed
        if tune_thresholds and has_au:
            thr = np.asarray(sub.tune_au_thresholds())
        windows: dict[str, int] = {}
        if smoothing:
            windows, _ = tune(sub, video[train], frame[train], grid=grid, au_thresholds=thr)
            if tune_thresholds and has_au:
                thr = np.asarray(smooth(sub, video[train], frame[train], windows).tune_au_thresholds())
        for task, w in windows.items():
            new[SMOOTHED[task]][held] = moving_average(state[SMOOTHED[task]][held], video[held], frame[held], w)
        if tune_thresholds and has_au:
            new["au_prob"][held] = (new["au_prob"][held] >= thr).astype(np.float32)
        per_fold.append(windows)
        per_thr.append(np.asarray(thr).tolist())
    out = acc.with_predictions(**new)
    binarized = tune_thresholds and has_au
    tuned = [x for x, on in (("smoothing", smoothing), ("AU thresholds", binarized)) if on]
    return {"scores": out.compute(au_thresholds=None if binarized else au_thresholds), "folds": folds,
            "fold_windows": per_fold, "fold_thresholds": per_thr if has_au else None, "tuned": tuned, "acc": out,
            "au_thresholds": None if binarized else au_thresholds}


def cross_validated_result(acc: MetricAccumulator, video: np.ndarray, frame: np.ndarray, folds: int, *,
                           au_thresholds: Sequence[float] | None = None, seed: int = 0, smoothing: bool = True,
                           tune_thresholds: bool = False) -> dict[str, Any]:
    """The ``cross_validated`` entry of an evaluation with tuned steps: the held-out scores of
    ``tune_cross_validated`` with their 95% intervals over recordings."""
    from affpipe.io import jsonable
    from affpipe.scoring.bootstrap import bootstrap_ci, video_stats

    cv = tune_cross_validated(acc, video, frame, folds, seed=seed, au_thresholds=au_thresholds, smoothing=smoothing,
                              tune_thresholds=tune_thresholds)
    keys = ("va_ccc", "valence_ccc", "arousal_ccc", "expr_f1", "au_f1", "au_f1_per_au", "p_mtl")
    ci = bootstrap_ci(video_stats(cv["acc"].state(), video, cv["au_thresholds"]), seed=seed)
    return jsonable({**{k: cv["scores"][k] for k in keys if k in cv["scores"]}, "folds": folds,
                     "fold_windows": cv["fold_windows"], "fold_thresholds": cv["fold_thresholds"],
                     "tuned": cv["tuned"], "ci": {k: ci["ci"][k] for k in keys if k in ci["ci"]},
                     "ci_method": ci["ci_method"]})


def save_windows(folder: Path, windows: Mapping[str, int], *, split: str, checkpoint: str,
                 scores: Mapping[str, Mapping[int, float]], step: int | None = None) -> Path:
    """``folder/smoothing.json``: the tuned windows, where they were tuned (split, checkpoint and
    the step it held) and every candidate's score."""
    return RunFolder(folder).write_smoothing({
        "windows": dict(windows), "split": split, "checkpoint": checkpoint,
        **({} if step is None else {"step": step}),
        "scores": {t: {str(w): s for w, s in v.items()} for t, v in scores.items()}})


def load_windows(folder: Path, *, with_split: bool = False):
    """The windows of ``folder/smoothing.json`` (and, with ``with_split``, the split they were
    tuned on); a clear error when it is missing or malformed."""
    files = RunFolder(folder)
    path = files.smoothing
    saved = files.read_smoothing()
    try:
        out = {str(t): int(w) for t, w in saved["windows"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a smoothing file ({type(exc).__name__}: {exc})") from exc
    bad = {t: w for t, w in out.items() if t not in SMOOTHED or w < 1 or w % 2 == 0}
    if bad:
        raise ValueError(f"{path}: bad windows {bad} (tasks va/expr/au, positive odd frame counts)")
    return (out, saved.get("split")) if with_split else out
