"""Sequence windows over (video, frame): length ``T``, stride ``S``, gaps masked.

A video's timeline runs from its first to its last frame with a row; frame numbers without a
row (no face crop) are *gaps*: they keep their place in the window (so ``T`` consecutive
positions are always ``T`` consecutive frames) and are masked, never collapsed. Every video's
timeline is laid end to end with ``T - 1`` padding positions after it, so a window is a slice
``timeline[start : start + T]`` that never crosses into the next video.

Training: windows every ``stride`` frames, shuffled across videos per epoch (seeded).
Evaluation: windows every ``stride`` frames plus one ending at each video's last frame, so
every row is covered at least once; ``affpipe.temporal.data.WindowLoader`` averages the
overlapping outputs so each row gets exactly one prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GAP = -1


@dataclass(frozen=True)
class WindowPlan:
    """Window starts into a padded timeline; ``timeline[p]`` is a row position or ``GAP``."""

    length: int
    timeline: np.ndarray  # int64 [L]
    starts: np.ndarray  # int64 [W]
    video_of_window: np.ndarray  # int32 [W]

    def __len__(self) -> int:
        return int(len(self.starts))

    def rows(self, windows: np.ndarray) -> np.ndarray:
        """``int64 [len(windows), T]`` row positions (``GAP`` where there is none)."""
        return self.timeline[self.starts[windows][:, None] + np.arange(self.length)]


def plan_windows(video: np.ndarray, frame: np.ndarray, rows: np.ndarray, *, length: int, stride: int,
                 cover: bool) -> WindowPlan:
    """Windows over the rows ``rows`` (positions into arrays sorted by (video, frame)).

    ``cover=True`` adds, per video, a window ending at its last frame (evaluation: every row
    covered). Windows holding no row at all (a gap longer than ``T``) are dropped.
    """
    if length < 1 or stride < 1:
        raise ValueError(f"window length and stride must be >= 1, got {length}, {stride}")
    rows = np.asarray(rows, np.int64)
    if len(rows) == 0:
        return WindowPlan(length, np.full(0, GAP, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32))
    v, f = np.asarray(video)[rows], np.asarray(frame, np.int64)[rows]
    bounds = np.flatnonzero(np.r_[True, v[1:] != v[:-1], True])
    first, last = f[bounds[:-1]], f[bounds[1:] - 1]
    span = last - first + 1
    offset = np.concatenate([[0], np.cumsum(span + length - 1)[:-1]])
    timeline = np.full(int((span + length - 1).sum()), GAP, np.int64)
    video_idx = np.repeat(np.arange(len(span)), np.diff(bounds))
    timeline[offset[video_idx] + f - first[video_idx]] = rows
    starts, owner = [], []
    for k in range(len(span)):  # one iteration per video: ~560 at full scale
        s = np.arange(0, max(int(span[k]) - length, 0) + 1, stride)
        if cover and s[-1] + length < span[k]:
            s = np.r_[s, span[k] - length]
        starts.append(offset[k] + s)
        owner.append(np.full(len(s), v[bounds[k]], np.int32))
    starts_a, owner_a = np.concatenate(starts), np.concatenate(owner)
    has_row = (timeline[starts_a[:, None] + np.arange(length)] != GAP).any(1)
    return WindowPlan(length, timeline, starts_a[has_row], owner_a[has_row])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Seeded per-epoch permutation of ``n`` windows (shuffled across videos)."""
    return np.random.default_rng([seed, epoch, 0x7E4]).permutation(n)
