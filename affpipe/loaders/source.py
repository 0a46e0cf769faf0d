"""A plan's samples read straight from the tars: memory maps and each sample's member offsets.

Both backends follow the same epoch plan (``affpipe.loaders.plan``): a batch is a list of
``(shard, sample)`` pairs, and this table turns them into the JPEG bytes (zero-copy views of the
memory-mapped tar) and the 32-byte label records, with numpy doing the per-batch gathers so no
per-sample Python runs on the hot path but the decode itself.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from affpipe.labels import RECORD_SIZE
from affpipe.loaders.base import Shard
from affpipe.shards.format import idx_member_arrays

MISSING = -1  # offset of a member a sample lacks (idx_member_arrays); the careful path names it


class ShardTable:
    """Per shard: the memory-mapped tar and ``[n, 2]`` (offset, size) of each sample's members."""

    def __init__(self, shards: list[Shard]) -> None:
        self.shards = shards
        self._maps: list[mmap.mmap] = []
        self.views: list[np.ndarray] = []
        self.jpg: list[np.ndarray] = []
        self.lbl: list[np.ndarray] = []
        for s in shards:
            with open(s.tar, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps.append(mm)
            self.views.append(np.frombuffer(mm, np.uint8))
            members = idx_member_arrays(Path(s.idx), ("jpg", "lbl"))
            self.jpg.append(members["jpg"][: s.samples])
            self.lbl.append(members["lbl"][: s.samples])

    def _gather(self, arrays: list[np.ndarray], sel: np.ndarray) -> np.ndarray:
        out = np.empty((len(sel), 2), np.int64)
        for shard in np.unique(sel[:, 0]):
            rows = np.nonzero(sel[:, 0] == shard)[0]
            out[rows] = arrays[int(shard)][sel[rows, 1]]
        return out

    def lbl_sizes(self, sel: np.ndarray) -> np.ndarray:
        """The ``.lbl`` member size of each selected sample (0 where it lacks one)."""
        return np.where(self._gather(self.lbl, sel)[:, 0] == MISSING, 0, self._gather(self.lbl, sel)[:, 1])

    def jpeg_where(self, sel: np.ndarray) -> list[tuple[int, int, int]]:
        """``(shard, offset, size)`` of each selected sample's JPEG, as Python ints (numpy
        scalars cost ~1 µs each on the per-sample path)."""
        where = np.concatenate([sel[:, :1], self._gather(self.jpg, sel)], axis=1)
        return [tuple(r) for r in where.tolist()]

    def jpegs(self, sel: np.ndarray) -> list[np.ndarray] | None:
        """Zero-copy views of the selected JPEGs; None when a sample lacks its ``.jpg``."""
        where = self.jpeg_where(sel)
        if any(off == MISSING for _, off, _ in where):
            return None
        return [self.views[s][off:off + n] for s, off, n in where]

    def records(self, sel: np.ndarray) -> np.ndarray | None:
        """``uint8 [n, 32]`` label records of ``sel``; None when one is missing or malformed."""
        lbl = self._gather(self.lbl, sel)
        if (lbl[:, 0] == MISSING).any() or (lbl[:, 1] != RECORD_SIZE).any():
            return None
        out = np.empty((len(sel), RECORD_SIZE), np.uint8)
        for shard in np.unique(sel[:, 0]):
            rows = np.nonzero(sel[:, 0] == shard)[0]
            out[rows] = self.views[int(shard)][lbl[rows, :1] + np.arange(RECORD_SIZE)]
        return out

