"""Fused features: several feature tables of the same index, joined row for row and concatenated.

``fuse_tables([a, b])`` checks that the tables belong together — made from the same label
index (their lineage), holding the same rows in the same order — and returns one
``FeatureTable`` whose ``features`` is a ``FusedMatrix``: indexing it gathers the rows from each
memory-mapped table and concatenates them, so a window batch reads ``D_a + D_b`` features per
frame without a fused copy of the tables ever being made (at full scale that copy would be
gigabytes). Tables that disagree are one error naming both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from affpipe.temporal.features import FeatureTable, features_fingerprint


class FusedMatrix:
    """The column-wise concatenation of ``[N, D_i]`` matrices, gathered on indexing (no copy)."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        rows = {int(p.shape[0]) for p in parts}
        if len(rows) != 1:
            raise ValueError(f"fused matrices must have the same rows, got {sorted(rows)}")
        self.parts = tuple(parts)
        self.dtype = np.result_type(*[p.dtype for p in parts])
        self.shape = (rows.pop(), sum(int(p.shape[1]) for p in parts))
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        return np.concatenate([np.asarray(p[index], self.dtype) for p in self.parts], axis=-1)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # np.asarray(fused): the whole copy, on request
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def index_identity(table: FeatureTable) -> str | None:
    """What a table says it was made from: its label index's fingerprint (``affpipe embed``
    records it), else the index folder its manifest names, resolved, and the table name."""
    from affpipe.lineage import resolve_path

    m = table.manifest
    if isinstance(m.get("index_fingerprint"), str):
        return m["index_fingerprint"]
    if isinstance(m.get("index"), str):
        return f"{resolve_path(Path(table.path).parent, m['index']).resolve()} ({m.get('table', 'frames')})"
    return None


def fuse_tables(tables: Sequence[FeatureTable]) -> FeatureTable:
    """One table with the features of ``tables`` side by side (see the module docstring)."""
    if len(tables) == 1:
        return tables[0]
    first = tables[0]
    for other in tables[1:]:
        a, b = index_identity(first), index_identity(other)
        if a != b:
            raise ValueError(f"{first.path.parent} was made from index {a}, but {other.path.parent} from {b}: "
                             "fused feature tables must come from the same index")
        if len(other) != len(first) or not np.array_equal(other.row_id, first.row_id):
            only_a = np.setdiff1d(first.row_id, other.row_id).size
            only_b = np.setdiff1d(other.row_id, first.row_id).size
            raise ValueError(f"{first.path.parent} ({len(first)} rows) and {other.path.parent} ({len(other)} rows) "
                             f"hold different frames ({only_a} only in the first, {only_b} only in the second): "
                             "embed both over the same shards and splits")
    manifest: dict[str, Any] = dict(first.manifest)
    # per-frame heads of one source cannot start a skip path over the fused width: none is named
    manifest.update(feature_dim=sum(t.dim for t in tables), source_checkpoint=None, fused=[
        {"path": str(Path(t.path).parent), "backbone": t.manifest.get("backbone"),
         "source_sha256": t.manifest.get("source_sha256"), "feature_dim": t.dim,
         "fingerprint": features_fingerprint(t.manifest)} for t in tables])
    return dataclasses.replace(first, features=FusedMatrix([t.features for t in tables]), manifest=manifest)
