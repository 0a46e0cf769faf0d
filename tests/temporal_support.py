"""A tiny feature table for the temporal tests: 3 videos, every 7th frame without a crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from affpipe.labels import RECORD_SIZE, encode_records
from affpipe.temporal.data import RowLabels
from affpipe.temporal.features import (
    FEATURE_SCHEMA_VERSION,
    read_table,
    sort_order,
    write_manifest,
    write_table,
)


def toy_table(folder: Path, n_videos: int = 3, n: int = 20, dim: int = 8):
    rng = np.random.default_rng(0)
    video, frame = [], []
    for v in range(n_videos):
        f = np.arange(1, n + 1)
        f = f[(f % 7) != 0]
        video += [f"v{v}"] * len(f)
        frame += f.tolist()
    video, frame = np.array(video, object), np.array(frame)
    perm = rng.permutation(len(video))
    video, frame = video[perm], frame[perm]
    o = sort_order(video, frame)
    feats = rng.normal(size=(len(video), dim)).astype(np.float16)
    write_table(folder / "features.arrow", row_id=np.arange(len(video))[o] + 100, video=video[o], frame=frame[o],
                split=np.where(video[o] == "v0", "val", "train"), features=feats[o])
    write_manifest(folder, {"schema_version": FEATURE_SCHEMA_VERSION, "feature_dim": dim})
    return read_table(folder)


def labels(n: int) -> RowLabels:
    """Random valid labels for ``n`` rows, as the records the shards would carry."""
    rng = np.random.default_rng(1)
    ones = np.ones(n, bool)
    rec = encode_records(np.arange(n), rng.uniform(-1, 1, n), rng.uniform(-1, 1, n), rng.integers(0, 8, n),
                         (rng.random((n, 12)) < 0.3).astype(np.int8), ones, ones, ones)
    return RowLabels(torch.from_numpy(rec.view(np.uint8).reshape(n, RECORD_SIZE).copy()))
