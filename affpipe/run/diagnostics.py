"""evaluate's diagnostic plots, drawn from an evaluation's per-frame arrays (a
``MetricAccumulator.state()``): the EXPR confusion matrix (each label's row normalized), per-AU
precision-recall curves with the threshold in use marked, and valence/arousal predictions
against labels over the frames of a few videos. File names: ``run/folder.py`` (``DIAGNOSTICS``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from affpipe.labels import AU_NAMES, EXPR_CLASSES
from affpipe.run.folder import RunFolder

log = logging.getLogger(__name__)

VA_VIDEOS = 4  # videos drawn in the VA plot: the ones with the most labelled frames


def write_diagnostics(folder: RunFolder, stem: str, arrays: Mapping[str, np.ndarray], videos: Any = None, *,
                      au_thresholds: Sequence[float] | None = None) -> list[Path]:
    """The plots the arrays allow (a task without labels gets none); returns the files written."""
    written = []
    if "expr_prob" in arrays and np.asarray(arrays["expr_mask"]).any():
        written.append(_save(confusion_figure(arrays), folder.diagnostic(stem, "confusion")))
    if "au_prob" in arrays and np.asarray(arrays["au_mask"]).any():
        written.append(_save(au_pr_figure(arrays, au_thresholds), folder.diagnostic(stem, "au_pr")))
    if "va_pred" in arrays and videos is not None and np.asarray(arrays["va_mask"]).any():
        written.append(_save(va_videos_figure(arrays, np.asarray(videos)), folder.diagnostic(stem, "va_videos")))
    if written:
        log.info("diagnostic plots: %s", ", ".join(p.name for p in written))
    return written


def _save(fig: Figure, path: Path) -> Path:
    from affpipe.io import atomic_open

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


def confusion_matrix(target: np.ndarray, pred: np.ndarray, n: int = len(EXPR_CLASSES)) -> np.ndarray:
    """``[n, n]`` counts, rows the labels, columns the predictions."""
    m = np.zeros((n, n), np.int64)
    np.add.at(m, (target.astype(np.int64), pred.astype(np.int64)), 1)
    return m


def confusion_figure(arrays: Mapping[str, np.ndarray]) -> Figure:
    mask = np.asarray(arrays["expr_mask"], bool)
    counts = confusion_matrix(np.asarray(arrays["expr_target"])[mask], np.asarray(arrays["expr_prob"])[mask].argmax(1))
    rows = counts.sum(1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig = Figure(figsize=(7, 6), dpi=110, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    n = len(EXPR_CLASSES)
    ax.set_xticks(range(n), EXPR_CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(n), [f"{c} ({int(r)})" for c, r in zip(EXPR_CLASSES, rows[:, 0], strict=True)])
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("label (frames)")
    ax.set_title("EXPR confusion matrix (each label's row sums to 1)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def precision_recall(score: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and the threshold of each distinct score (descending)."""
    order = np.argsort(-score, kind="stable")
    s, t = score[order], target[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last frame of each distinct score
    tp = np.cumsum(t)[last]
    predicted = last + 1.0
    positives = max(t.sum(), 1.0)
    return tp / predicted, tp / positives, s[last]


def au_pr_figure(arrays: Mapping[str, np.ndarray], thresholds: Sequence[float] | None) -> Figure:
    prob, target, mask = (np.asarray(arrays[k]) for k in ("au_prob", "au_target", "au_mask"))
    th = list(thresholds) if thresholds is not None else [0.5] * len(AU_NAMES)
    fig = Figure(figsize=(13, 9), dpi=100, layout="constrained")
    axes = fig.subplots(3, 4, sharex=True, sharey=True).ravel()
    for j, (ax, name) in enumerate(zip(axes, AU_NAMES, strict=True)):
        m = mask[:, j] if mask.ndim == 2 else mask
        y, p = target[m, j], prob[m, j]
        ax.set_title(f"{name} ({int(y.sum())} of {len(y)} frames on)", fontsize=9)
        if len(y) == 0 or y.sum() == 0:
            ax.text(0.5, 0.5, "no positive label", ha="center", va="center", transform=ax.transAxes)
            continue
        precision, recall, cut = precision_recall(p, y)
        ax.plot(recall, precision, lw=1.2)
        k = int(np.argmin(np.abs(cut - th[j])))
        ax.plot(recall[k], precision[k], "o", color="C3", label=f"threshold {th[j]:.2f}")
        ax.axhline(y.mean(), color="0.7", lw=0.8, ls="--")
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes[8:]:
        ax.set_xlabel("recall")
    for ax in axes[::4]:
        ax.set_ylabel("precision")
    fig.suptitle("AU precision-recall (dashed: the share of frames on)")
    return fig


def va_videos_figure(arrays: Mapping[str, np.ndarray], videos: np.ndarray, n: int = VA_VIDEOS) -> Figure:
    mask = np.asarray(arrays["va_mask"])
    mask = mask.all(1) if mask.ndim == 2 else mask.astype(bool)
    names, counts = np.unique(videos[mask], return_counts=True)
    chosen = names[np.argsort(-counts, kind="stable")[:n]]
    row_id = np.asarray(arrays["row_id"])
    fig = Figure(figsize=(12, 2.6 * len(chosen)), dpi=100, layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(chosen), 2, squeeze=False))
    for (ax_v, ax_a), video in zip(axes, chosen, strict=True):
        at = np.flatnonzero((videos == video) & mask)
        at = at[np.argsort(row_id[at], kind="stable")]  # row ids follow (video, frame) order
        for ax, d, what in ((ax_v, 0, "valence"), (ax_a, 1, "arousal")):
            ax.plot(arrays["va_target"][at, d], color="0.3", lw=1, label="label")
            ax.plot(arrays["va_pred"][at, d], color="C1", lw=1, label="prediction")
            ax.set_ylim(-1.05, 1.05)
            ax.set_title(f"{video}: {what}", fontsize=9)
        ax_v.legend(fontsize=7, loc="upper right")
    for ax in axes[-1]:
        ax.set_xlabel("labelled frame (in order)")
    return fig
