"""One person, one track: faces linked across frames, short tracks dropped, tracks named.

Deterministic by construction (no randomness, ties broken by index): detections are linked
frame by frame to the tracks seen within ``max_gap`` frames, greedily by overlap (IoU, or, for a
fast move, centre distance within half a face width); tracks shorter than ``min_length`` are
dropped (counted); tracks that follow one another in time at about the same place are then
joined, so a person who leaves the picture for a while keeps one track. Names follow the
release: one track ``<video>``, two ``<video>_left``/``<video>_right`` by mean x, more
``<video>_1``… by mean x.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Track:
    """Detections of one face: ``members`` as (frame position, detection index)."""

    members: list[tuple[int, int]] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)

    @property
    def first(self) -> int:
        return self.members[0][0]

    @property
    def last(self) -> int:
        return self.members[-1][0]

    def center(self) -> np.ndarray:
        b = np.asarray(self.boxes)
        return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1).mean(0)

    def width(self) -> float:
        b = np.asarray(self.boxes)
        return float(np.mean(b[:, 2] - b[:, 0]))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boxes (x1, y1, x2, y2)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _affinity(a: np.ndarray, b: np.ndarray, min_iou: float) -> float:
    o = iou(a, b)
    if o >= min_iou:
        return 1.0 + o
    ca, cb = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    reach = 0.5 * max(a[2] - a[0], b[2] - b[0])
    d = float(np.hypot(*(ca - cb)))
    return 1.0 - d / reach if d < reach else 0.0


def link(boxes_per_frame: list[np.ndarray], *, max_gap: int = 25, min_iou: float = 0.3) -> list[Track]:
    """Tracks from the boxes of each frame (position in the list = frame position)."""
    tracks: list[Track] = []
    for t, boxes in enumerate(boxes_per_frame):
        active = [k for k, tr in enumerate(tracks) if t - tr.last <= max_gap]
        pairs = sorted((-_affinity(tracks[k].boxes[-1], boxes[j], min_iou), k, j)
                        for k in active for j in range(len(boxes)))
        used_t, used_d = set(), set()
        for neg, k, j in pairs:
            if neg >= 0 or k in used_t or j in used_d:
                continue
            used_t.add(k)
            used_d.add(j)
            tracks[k].members.append((t, j))
            tracks[k].boxes.append(boxes[j])
        for j in range(len(boxes)):
            if j not in used_d:
                tracks.append(Track([(t, j)], [boxes[j]]))
    return tracks


def join(tracks: list[Track], *, reach: float = 1.0) -> list[Track]:
    """Join tracks that follow one another (no shared frame) with mean centres within ``reach``
    face widths, nearest first; the result is ordered by first frame."""
    chains: list[Track] = []
    for tr in sorted(tracks, key=lambda x: (x.first, x.members[0][1])):
        best, best_d = None, None
        for c in chains:
            if c.last >= tr.first:
                continue
            d = float(np.hypot(*(c.center() - tr.center()))) / max(1e-6, max(c.width(), tr.width()))
            if d <= reach and (best_d is None or d < best_d):
                best, best_d = c, d
        if best is None:
            chains.append(Track(list(tr.members), list(tr.boxes)))
        else:
            best.members += tr.members
            best.boxes += tr.boxes
    return chains


def build_tracks(boxes_per_frame: list[np.ndarray], *, min_length: int, max_gap: int) -> tuple[list[Track], int]:
    """Kept tracks (ordered by mean x, then first frame) and the number dropped as too short."""
    linked = link(boxes_per_frame, max_gap=max_gap)
    kept = [tr for tr in linked if len(tr.members) >= min_length]
    chains = join(kept)
    chains.sort(key=lambda c: (float(c.center()[0]), c.first))
    return chains, len(linked) - len(kept)


def track_names(video: str, n: int) -> list[str]:
    """Folder names of ``n`` tracks ordered by mean x, as the release names them."""
    if n == 1:
        return [video]
    if n == 2:
        return [f"{video}_left", f"{video}_right"]
    return [f"{video}_{i}" for i in range(1, n + 1)]
