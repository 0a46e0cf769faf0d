"""95% confidence intervals by bootstrap over videos, and paired comparisons of two runs.

Frames of one video are strongly correlated, so the independent unit of a validation split is
the video: a bootstrap resample draws videos with replacement and keeps each drawn video's frames
together. Every metric affpipe reports is a function of per-video sufficient statistics, so a
resample is a weight vector over videos (how often each was drawn) and all resamples are one
matrix product ``weights [B, V] @ stats [V, K]``:

- CCC: per video and dimension, n, Σx, Σy, Σx², Σy², Σxy (population moments of the pooled frames);
- EXPR macro F1: per video and class, TP, FP, FN (F1 = 2TP / (2TP + FP + FN), 0 where undefined);
- AU macro F1: per video and AU, TP, FP, FN and the annotated count (an AU no drawn video
  annotates is NaN and stays out of the macro mean, as in ``metrics.au_f1``);
- P_MTL: the sum of the three, per resample.

The resampling unit is the *recording*: the ``_left`` and ``_right`` subjects of one two-subject
video share its frames, scene and annotator, so they are drawn (and cross-validation folds are
dealt) together (``recording_of``). The cost is one pass over the frames (``np.bincount`` per
column) plus a ``[B, V] @ [V, K]`` product; BENCHMARKS.md gives the figure at Aff-Wild2's size.
The interval method (percentile, BCa, studentized) is chosen in ``scoring.intervals`` from the
coverage measured by ``affpipe.bench.coverage``; the point value stays the full-split metric, and
every interval states how many videos (and recordings) of each task it rests on.
A paired comparison applies the same weights to two runs' statistics (same videos, same labels),
so the interval of the difference accounts for the videos both runs are scored on.
"""

from __future__ import annotations

import io
import logging
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from affpipe.io import atomic_write_bytes
from affpipe.labels import AU_NAMES, EXPR_CLASSES, NUM_AU, NUM_EXPR
from affpipe.scoring import intervals as iv

log = logging.getLogger(__name__)

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95
SUBJECT_SUFFIXES = ("_left", "_right")
SCALAR_METRICS = ("va_ccc", "valence_ccc", "arousal_ccc", "expr_f1", "au_f1", "p_mtl")
PER_ITEM = {"expr_f1_per_class": EXPR_CLASSES, "au_f1_per_au": AU_NAMES}


@dataclass(frozen=True)
class VideoStats:
    """Per-video sufficient statistics of one run's predictions on one split.

    ``videos`` [V] names (sorted); ``va`` [V, 2, 6] (per dimension: n, Σx, Σy, Σx², Σy², Σxy;
    x = prediction, y = label); ``expr`` [V, 3, 8] (TP, FP, FN per class); ``au`` [V, 4, 12]
    (TP, FP, FN, annotated per AU). A task the run lacks is None. With ``unit="recording"`` the
    rows are recordings (``recording_of``) and ``labelled`` counts, per task, the videos and
    recordings with at least one valid label.
    """

    videos: np.ndarray
    va: np.ndarray | None = None
    expr: np.ndarray | None = None
    au: np.ndarray | None = None
    labelled: dict | None = None

    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t in ("va", "expr", "au") if getattr(self, t) is not None)


def _sum_by(codes: np.ndarray, n: int, columns: np.ndarray) -> np.ndarray:
    """``[n, C]``: per code, the sum of each column of ``columns [N, C]`` (float64)."""
    columns = np.asarray(columns, np.float64)
    return np.stack([np.bincount(codes, weights=columns[:, j], minlength=n) for j in range(columns.shape[1])], 1)


def recording_of(videos: Sequence[str] | np.ndarray) -> np.ndarray:
    """The recording of each video name: ``<name>_left`` and ``<name>_right`` are one recording."""
    names, codes = np.unique(np.asarray(videos).astype(str), return_inverse=True)
    base = np.array([n[: -len(sx)] if (sx := next((x for x in SUBJECT_SUFFIXES if n.endswith(x)), "")) else n
                     for n in names.tolist()], dtype=str)
    return base[codes.reshape(-1)] if len(names) else np.asarray(videos).astype(str)


def video_stats(arrays: Mapping[str, np.ndarray], videos: Sequence[str] | np.ndarray,
                au_thresholds: Sequence[float] | None = None, *, unit: str = "recording") -> VideoStats:
    """The per-recording statistics of a ``MetricAccumulator.state()`` (or arrays with the same keys:
    ``va_pred``/``va_target``/``va_mask``, ``expr_pred``/``expr_target``/``expr_mask``,
    ``au_prob``/``au_target``/``au_mask``); ``videos`` names each row's video, in row order.
    ``unit="video"`` keeps the two subjects of a recording apart (not independent: tests only)."""
    video = np.asarray(videos)
    if unit not in ("recording", "video"):
        raise ValueError(f"bootstrap unit must be 'recording' or 'video', got {unit!r}")
    names, codes = np.unique(recording_of(video) if unit == "recording" else video, return_inverse=True)
    codes = codes.astype(np.int64).reshape(-1)
    n = len(names)
    rows = len(codes)
    out: dict[str, np.ndarray] = {}
    if "va_pred" in arrays:
        m = np.asarray(arrays["va_mask"], bool)
        _check_rows("va_pred", arrays["va_pred"], rows)
        x = np.asarray(arrays["va_pred"], np.float64)[m]
        y = np.asarray(arrays["va_target"], np.float64)[m]
        c = codes[m]
        dims = [_sum_by(c, n, np.stack([np.ones(len(c)), x[:, d], y[:, d], x[:, d] ** 2, y[:, d] ** 2,
                                        x[:, d] * y[:, d]], 1)) for d in range(2)]
        out["va"] = np.stack(dims, 1)
    if "expr_pred" in arrays:
        _check_rows("expr_pred", arrays["expr_pred"], rows)
        m = np.asarray(arrays["expr_mask"], bool)
        p = np.asarray(arrays["expr_pred"], np.int64)[m]
        t = np.asarray(arrays["expr_target"], np.int64)[m]
        c = codes[m]
        hit = p == t
        tp = np.bincount(c[hit] * NUM_EXPR + t[hit], minlength=n * NUM_EXPR).reshape(n, NUM_EXPR)
        pred = np.bincount(c * NUM_EXPR + p, minlength=n * NUM_EXPR).reshape(n, NUM_EXPR)
        true = np.bincount(c * NUM_EXPR + t, minlength=n * NUM_EXPR).reshape(n, NUM_EXPR)
        out["expr"] = np.stack([tp, pred - tp, true - tp], 1).astype(np.float64)
    if "au_prob" in arrays:
        _check_rows("au_prob", arrays["au_prob"], rows)
        thr = np.full(NUM_AU, 0.5) if au_thresholds is None else np.asarray(au_thresholds, np.float64)
        m = np.asarray(arrays["au_mask"], bool)
        p = (np.asarray(arrays["au_prob"]) >= thr) & m
        t = (np.asarray(arrays["au_target"]) > 0.5) & m
        out["au"] = np.stack([_sum_by(codes, n, p & t), _sum_by(codes, n, p & ~t), _sum_by(codes, n, ~p & t),
                              _sum_by(codes, n, m)], 1)
    return VideoStats(videos=names, labelled=_labelled(arrays, video, codes), **out)


def _labelled(arrays: Mapping[str, np.ndarray], video: np.ndarray, codes: np.ndarray) -> dict[str, dict[str, int]]:
    """Per task: the videos and resampling units with at least one valid label."""
    out = {}
    for task, key in (("va", "va_mask"), ("expr", "expr_mask"), ("au", "au_mask")):
        if key in arrays:
            m = np.asarray(arrays[key], bool)
            m = m.any(1) if m.ndim == 2 else m
            out[task] = {"videos": int(len(np.unique(video[m]))), "units": int(len(np.unique(codes[m])))}
    return out


def unlabelled_items(stats: VideoStats) -> dict[str, dict[str, list[str]]]:
    """Classes / AUs without a label on the whole split: ``{"expr": {"no_label": [...]},
    "au": {"not_annotated": [...], "no_positive": [...]}}`` (only the non-empty lists)."""
    out: dict[str, dict[str, list[str]]] = {}
    if stats.expr is not None:
        true = stats.expr[:, 0].sum(0) + stats.expr[:, 2].sum(0)  # TP + FN = labelled frames per class
        if (true == 0).any():
            out["expr"] = {"no_label": [c for c, t in zip(EXPR_CLASSES, true, strict=True) if t == 0]}
    if stats.au is not None:
        ann, pos = stats.au[:, 3].sum(0), stats.au[:, 0].sum(0) + stats.au[:, 2].sum(0)
        au = {"not_annotated": [a for a, n in zip(AU_NAMES, ann, strict=True) if n == 0],
              "no_positive": [a for a, n, p in zip(AU_NAMES, ann, pos, strict=True) if n > 0 and p == 0]}
        if any(au.values()):
            out["au"] = {k: v for k, v in au.items() if v}
    return out


def _check_rows(key: str, value: Any, rows: int) -> None:
    if len(value) != rows:
        raise ValueError(f"bootstrap: {key} has {len(value)} rows but {rows} rows have a video")


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    den = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)


def _ccc_from_sums(s: np.ndarray) -> np.ndarray:
    """CCC from summed moments ``[..., 6]`` (NaN where n = 0, 1 where both series are constant and equal)."""
    n = s[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = s[..., 1] / n, s[..., 2] / n
        vx = s[..., 3] / n - mx ** 2
        vy = s[..., 4] / n - my ** 2
        cov = s[..., 5] / n - mx * my
        den = vx + vy + (mx - my) ** 2
        out = np.where(den > 0, 2 * cov / np.where(den > 0, den, 1), 1.0)
    return np.where(n > 0, out, np.nan)


def metrics_from_stats(stats: VideoStats, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for each row of ``weights [B, V]`` (how often each video is counted).

    Scalars come back as ``[B]`` arrays, per-class / per-AU F1 as ``[B, 8]`` / ``[B, 12]``. A row of
    ones reproduces ``MetricAccumulator.compute()`` (up to float rounding of the CCC moments).
    """
    w = np.asarray(weights, np.float64)
    if w.ndim != 2 or w.shape[1] != len(stats.videos):
        raise ValueError(f"weights must be [B, {len(stats.videos)}], got {w.shape}")
    out: dict[str, np.ndarray] = {}
    if stats.va is not None:
        s = (w @ stats.va.reshape(len(stats.videos), -1)).reshape(len(w), 2, 6)
        c = _ccc_from_sums(s)
        out.update(valence_ccc=c[:, 0], arousal_ccc=c[:, 1], va_ccc=c.mean(1))
    if stats.expr is not None:
        s = (w @ stats.expr.reshape(len(stats.videos), -1)).reshape(len(w), 3, NUM_EXPR)
        per = _f1(s[:, 0], s[:, 1], s[:, 2])
        out.update(expr_f1_per_class=per, expr_f1=per.mean(1))
    if stats.au is not None:
        s = (w @ stats.au.reshape(len(stats.videos), -1)).reshape(len(w), 4, NUM_AU)
        per = np.where(s[:, 3] > 0, _f1(s[:, 0], s[:, 1], s[:, 2]), np.nan)
        scored = ~np.isnan(per)
        macro = np.where(scored.any(1), np.nansum(per, 1) / np.maximum(scored.sum(1), 1), 0.0)
        out.update(au_f1_per_au=per, au_f1=macro)
    if all(k in out for k in ("va_ccc", "expr_f1", "au_f1")):
        out["p_mtl"] = out["va_ccc"] + out["expr_f1"] + out["au_f1"]
    return out


def resample_weights(n_videos: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[resamples, n_videos]`` draw counts: each row draws ``n_videos`` videos with replacement."""
    if n_videos < 1:
        raise ValueError("bootstrap: no videos to resample")
    if resamples < 1:
        raise ValueError(f"bootstrap: resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng([seed, 0xB007])
    return rng.multinomial(n_videos, np.full(n_videos, 1.0 / n_videos), size=resamples).astype(np.float64)


def _interval(values: np.ndarray, level: float) -> np.ndarray:
    """Percentile interval along axis 0 (NaN resamples, e.g. no labelled frame drawn, left out)."""
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    with warnings.catch_warnings():  # a class nobody labels has no interval: NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(values, q, axis=0)


def _pack(bounds: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``{metric: [lo, hi]}`` from ``[2, ...]`` bounds; per-item metrics as ``{name: [lo, hi]}`` (None for NaN)."""
    out: dict[str, Any] = {}
    for key, b in bounds.items():
        if key in PER_ITEM:
            out[key] = {name: _bounds(b[:, j]) for j, name in enumerate(PER_ITEM[key])}
        else:
            out[key] = _bounds(b)
    return out


def _bounds(iv_: np.ndarray) -> list[float | None] | None:
    lo, hi = (float(x) for x in iv_)
    return None if np.isnan(lo) or np.isnan(hi) else [lo, hi]


def method(n_videos: int, resamples: int, seed: int, level: float, *, interval: str = "percentile",
           stats: VideoStats | None = None) -> dict[str, Any]:
    """The ``ci_method`` record stored beside the intervals: the unit, how many videos and
    recordings each task rests on, and a warning for each task below ``intervals.MIN_RECORDINGS``."""
    out: dict[str, Any] = {"unit": "recording", "videos": int(n_videos), "resamples": int(resamples),
                           "seed": int(seed), "level": level, "interval": interval}
    if stats is not None and stats.labelled:
        out["recordings"] = int(len(stats.videos))
        out["videos"] = max(t["videos"] for t in stats.labelled.values())
        out["per_task"] = stats.labelled
        few = {t: c["units"] for t, c in stats.labelled.items() if c["units"] < iv.MIN_RECORDINGS}
        if few:
            out["warning"] = small_sample_warning(few)
    return out


def small_sample_warning(few: Mapping[str, int]) -> str:
    """The sentence shown under an interval resting on fewer recordings than coverage was shown for."""
    what = ", ".join(f"{t.upper()} {n}" for t, n in few.items())
    return (f"few recordings ({what}): below {iv.MIN_RECORDINGS} the nominal 95% intervals covered clearly less "
            "than 95% in the coverage simulation (BENCHMARKS.md); read them as too narrow")


def interval_bounds(stats: VideoStats, weights: np.ndarray, level: float = DEFAULT_LEVEL,
                    how: str = iv.DEFAULT_METHOD, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``{metric: [2, ...] bounds}`` of every metric of ``stats`` (or those of ``keys``) over the
    resamples ``weights [B, V]`` by ``how`` (``intervals.METHODS``)."""
    def fn(w: np.ndarray) -> dict[str, np.ndarray]:
        out = metrics_from_stats(stats, w)
        return out if keys is None else {k: out[k] for k in keys if k in out}

    n = len(stats.videos)
    boot, point = fn(weights), fn(np.ones((1, n)))
    jack = fn(iv.jackknife_weights(n)) if how != "percentile" else {}
    se = iv.resample_se(fn, weights) if how == "studentized" else {}
    out = {}
    for k, v in boot.items():
        b = iv.ci_bounds(point[k][0], v, level, how, jack=jack.get(k), boot_se=se.get(k))
        lo, hi = metric_range(k)
        out[k] = np.where(np.isnan(b), b, np.clip(b, lo, hi))  # a bootstrap-t bound can leave the metric's range
    return out


def metric_range(key: str) -> tuple[float, float]:
    """The values metric ``key`` can take: a CCC in [-1, 1], an F1 in [0, 1], P_MTL (their sum:
    VA CCC + EXPR F1 + AU F1) in [-1, 3]. A studentized interval is a point minus scaled
    quantiles and can reach past them (seen on 9 recordings: AU F1 [-0.05, 3.03]); its bounds are
    clipped to the range (the true value lies inside it, so clipping never lowers coverage)."""
    if key == "p_mtl":
        return -1.0, 3.0
    if key.endswith("_ccc"):
        return -1.0, 1.0
    if "f1" in key:
        return 0.0, 1.0
    raise KeyError(f"no range known for the metric {key!r}")


def bootstrap_ci(stats: VideoStats, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                 level: float = DEFAULT_LEVEL, how: str = iv.DEFAULT_METHOD) -> dict[str, Any]:
    """``{"ci": {metric: [lo, hi], ...}, "ci_method": {...}}`` for every metric ``stats`` supports
    (no intervals from a single recording: resampling one unit shows no variation, not certainty)."""
    n = len(stats.videos)
    if n < 2:
        return {"ci": {}, "ci_method": {**method(n, 0, seed, level, stats=stats),
                                        "note": "a single recording: no interval by bootstrap over recordings"}}
    w = resample_weights(n, resamples, seed)
    return {"ci": _pack(interval_bounds(stats, w, level, how)),
            "ci_method": method(n, resamples, seed, level, interval=how, stats=stats)}


def bootstrap_result(arrays: Mapping[str, np.ndarray], videos: Sequence[str] | np.ndarray, *,
                     au_thresholds: Sequence[float] | None = None, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = 0, level: float = DEFAULT_LEVEL, how: str = iv.DEFAULT_METHOD) -> dict[str, Any]:
    """Intervals for an evaluation: ``bootstrap_ci(video_stats(arrays, videos))`` and the classes /
    AUs without a label (``unlabelled``); with ``au_thresholds`` also ``tuned_ci`` for the AU
    metrics at those thresholds."""
    stats = video_stats(arrays, videos)
    out = bootstrap_ci(stats, resamples=resamples, seed=seed, level=level, how=how)
    unlabelled = unlabelled_items(stats)
    if unlabelled:  # shown n/a, with whether the macro counts them (eval.md)
        out["unlabelled"] = unlabelled
    if au_thresholds is not None and "au_prob" in arrays:
        tuned = bootstrap_ci(video_stats(arrays, videos, au_thresholds), resamples=resamples, seed=seed, level=level,
                             how=how)
        out["tuned_ci"] = {k: v for k, v in tuned["ci"].items() if k in ("au_f1", "au_f1_per_au", "p_mtl")}
    return out


def point_and_resamples(n_videos: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[1 + resamples, n_videos]``: a row of ones (the full split) above ``resample_weights``."""
    return np.vstack([np.ones((1, n_videos)), resample_weights(n_videos, resamples, seed)])


def difference(a: np.ndarray, b: np.ndarray, level: float = DEFAULT_LEVEL) -> dict[str, Any]:
    """``a − b`` of two ``[1 + B]`` metric arrays over the same weights (row 0: the full split):
    ``{"a", "b", "diff", "ci": [lo, hi] | None, "excludes_zero"}``."""
    bounds = _bounds(_interval(a[1:] - b[1:], level))
    return {"a": float(a[0]), "b": float(b[0]), "diff": float(a[0] - b[0]), "ci": bounds,
            "excludes_zero": bool(bounds is not None and (bounds[0] > 0 or bounds[1] < 0))}


def same_videos(stats: Sequence[VideoStats]) -> None:
    """Refuse statistics of runs scored on different videos (a paired comparison needs one split)."""
    videos = stats[0].videos
    for s in stats[1:]:
        if len(s.videos) != len(videos) or not (s.videos == videos).all():
            raise ValueError("paired bootstrap: the runs were not evaluated on the same videos")


def paired(a: Sequence[VideoStats] | VideoStats, b: Sequence[VideoStats] | VideoStats, *,
           resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = DEFAULT_LEVEL) -> dict[str, dict[str, Any]]:
    """Paired bootstrap of ``metric(a) − metric(b)`` over the same resampled recordings, per shared
    scalar metric (``difference``, with its bootstrap ``p``). ``a`` and ``b`` may each be several
    runs on the same split (seeds of a recipe): the seeds are resampled too (``intervals.two_level``),
    so the interval carries seed-to-seed variation rather than conditioning on the seeds drawn."""
    a = [a] if isinstance(a, VideoStats) else list(a)
    b = [b] if isinstance(b, VideoStats) else list(b)
    same_videos([*a, *b])
    w = point_and_resamples(len(a[0].videos), resamples, seed)
    ra, rb = [metrics_from_stats(s, w) for s in a], [metrics_from_stats(s, w) for s in b]
    out = {}
    for k in SCALAR_METRICS:
        if all(k in r for r in (*ra, *rb)):
            d = iv.two_level([r[k] for r in ra], [r[k] for r in rb], seed=seed)
            zero = np.zeros_like(d)
            zero[0] = 0.0
            out[k] = {**difference(d, zero, level), "p": iv.p_value(d[1:]),
                      "a": float(np.mean([r[k][0] for r in ra])), "b": float(np.mean([r[k][0] for r in rb]))}
    return out


def fmt_ci(value: float | None, bounds: Sequence[float] | None, *, signed: bool = False, digits: int = 3) -> str:
    """``0.412 [0.371, 0.455]`` (``+0.040 [+0.010, +0.070]`` when ``signed``); ``—`` when missing."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = f.format(value)
    if bounds:
        text += f" [{f.format(bounds[0])}, {f.format(bounds[1])}]"
    return text


def cross_validated_au(acc: Any, videos: np.ndarray, folds: int, *, seed: int = 0,
                       resamples: int = DEFAULT_RESAMPLES) -> dict[str, Any]:
    """The ``cross_validated`` entry of an evaluation with tuned AU thresholds: AU F1 (and P_MTL)
    with thresholds tuned on the other folds' videos (``MetricAccumulator.cross_validated_au``),
    with their 95% intervals over videos."""
    cv = acc.cross_validated_au(videos, folds, seed=seed)
    arrays = {**acc.state(), "au_prob": cv.pop("au_pred").astype(np.float32)}  # 0/1 at threshold 0.5
    ci = bootstrap_ci(video_stats(arrays, videos), resamples=resamples, seed=seed)["ci"]
    keys = ("au_f1", "au_f1_per_au", "p_mtl")
    return {**{k: cv[k] for k in keys if k in cv}, "folds": folds, "fold_thresholds": cv["fold_thresholds"],
            "ci": {k: ci[k] for k in keys if k in ci}}

def row_videos(label_table: Any) -> Any:
    """A function giving the video of each row id (rows of ``label_table``, with ``row_id`` and
    ``video``); a row id the table lacks is an error."""
    from affpipe.index.build import row_positions

    positions = row_positions(label_table)
    video = label_table.column("video").to_numpy(zero_copy_only=False)

    def lookup(row_id: np.ndarray) -> np.ndarray:
        try:
            return video[positions(row_id)]
        except KeyError as exc:
            raise ValueError(f"{exc.args[0]} predicted rows are not in the label table") from None

    return lookup

# ---- the per-frame predictions an evaluation keeps for later paired comparisons --------------

PREDICTIONS_VERSION = 1
# A MetricAccumulator's state: the metrics, the bootstrap and smoothing can all be redone from it.
_SAVED = ("row_id", "va_pred", "va_target", "va_mask", "expr_pred", "expr_prob", "expr_target", "expr_mask",
          "au_prob", "au_target", "au_mask")


def save_predictions(path: Path, arrays: Mapping[str, np.ndarray], videos: Sequence[str] | np.ndarray) -> Path:
    """``<stem>_predictions.npz`` beside ``eval.json``: each row's id, video, predictions (EXPR
    probabilities too, so smoothing can be redone from the file), labels and masks, compressed,
    written atomically; no pickled objects."""
    names, codes = np.unique(np.asarray(videos), return_inverse=True)
    data: dict[str, np.ndarray] = {"version": np.array(PREDICTIONS_VERSION), "videos": names.astype(str),
                                   "video_code": codes.astype(np.int32)}
    data.update({k: np.asarray(arrays[k]) for k in _SAVED if k in arrays})
    buf = io.BytesIO()
    np.savez_compressed(buf, **data)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_predictions(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``(arrays, video of each row)`` of a ``save_predictions`` file; a clear error otherwise."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{path}: not a predictions file affpipe evaluate wrote ({type(exc).__name__}: {exc})") from exc
    if int(data.get("version", -1)) != PREDICTIONS_VERSION or "row_id" not in data or "video_code" not in data:
        raise ValueError(f"{path}: not a version-{PREDICTIONS_VERSION} predictions file of affpipe evaluate")
    names, code, rows = data.pop("videos"), data.pop("video_code"), len(data["row_id"])
    bad = [k for k, v in data.items() if k != "version" and len(v) != rows]
    if len(code) != rows or bad or (rows and (code.min() < 0 or code.max() >= len(names))):
        raise ValueError(f"{path}: inconsistent row counts ({', '.join(bad) or 'video_code'}); the file is damaged")
    data.pop("version")
    return data, names[code]


def evaluation_intervals(acc: Any, videos: np.ndarray, predictions: Path | None, *,
                         au_thresholds: Sequence[float] | None = None,
                         resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """The ``ci``/``ci_method`` (and ``tuned_ci``) entries of an evaluation of ``acc`` (a filled
    ``MetricAccumulator``; ``videos``: the video of each of its rows), and, unless ``predictions``
    is None, its predictions saved there for ``affpipe report`` (the run folder names the file)."""
    arrays = acc.state()
    out = bootstrap_result(arrays, videos, au_thresholds=au_thresholds, resamples=resamples, seed=seed)
    if predictions is not None:
        path = save_predictions(Path(predictions), arrays, videos)
        out["predictions"] = path.name
    return out


def measure_cost(frames: int = 1_000_000, videos: int = 145, resamples: int = DEFAULT_RESAMPLES,
                 seed: int = 0) -> dict[str, float]:
    """Seconds for the intervals of a multi-task evaluation of ``frames`` synthetic frames in
    ``videos`` videos (Aff-Wild2's validation size by default): statistics pass, resamples, both,
    and writing the predictions file (with its size). ``python -m affpipe.scoring.bootstrap``."""
    import tempfile
    import time

    rng = np.random.default_rng(seed)
    n = frames
    arrays = {"va_pred": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
              "va_target": rng.uniform(-1, 1, (n, 2)).astype(np.float32), "va_mask": rng.random(n) < 0.9,
              "expr_pred": rng.integers(0, NUM_EXPR, n), "expr_target": rng.integers(0, NUM_EXPR, n).astype(np.int8),
              "expr_mask": rng.random(n) < 0.6, "au_prob": rng.random((n, NUM_AU), dtype=np.float32),
              "au_target": (rng.random((n, NUM_AU)) < 0.2).astype(np.int8), "au_mask": rng.random((n, NUM_AU)) < 0.8}
    video = np.sort(rng.integers(0, videos, n)).astype(str)
    t0 = time.perf_counter()
    stats = video_stats(arrays, video)
    t1 = time.perf_counter()
    bootstrap_ci(stats, resamples=resamples, seed=seed)
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_predictions(Path(tmp) / "predictions.npz", arrays, video)
        t3 = time.perf_counter()
        size = path.stat().st_size
    return {"frames": n, "videos": videos, "resamples": resamples, "stats_s": t1 - t0, "resample_s": t2 - t1,
            "intervals_s": t2 - t0, "save_predictions_s": t3 - t2, "predictions_mb": size / 1e6}


if __name__ == "__main__":  # the cost figure of BENCHMARKS.md
    import json
    import os

    for b in (1000, 2000):
        print(json.dumps({**measure_cost(resamples=b), "loadavg": os.getloadavg()}))
