"""The DALI loader keeps one pipeline for its lifetime: every epoch, every validation pass and a
pass abandoned halfway (``max_val_steps``, a benchmark window) reuse it and still yield exactly
the batches of the epoch plan."""

from __future__ import annotations

import pytest
import torch

from affpipe.loaders import make_loader

pytestmark = pytest.mark.dali


def _rows(batches) -> list[list[int]]:
    return [b.row_id.tolist() for b in batches]


def test_one_pipeline_across_epochs_and_abandoned_passes(shard_dir):
    kw = dict(batch_size=8, train=True, backend="dali", num_workers=1, seed=2, normalize=False)
    loader = make_loader(shard_dir, "train", **kw)
    fresh = make_loader(shard_dir, "train", **kw)
    first = list(loader)
    pipe = loader._pipe
    assert pipe is not None and len(first) == len(loader)
    it = iter(loader)  # abandon a pass after one batch: DALI has prefetched more of it
    next(it)
    del it
    loader.set_epoch(1)
    second = list(loader)
    assert loader._pipe is pipe  # not rebuilt
    fresh.set_epoch(1)
    expected = list(fresh)
    assert _rows(second) == _rows(expected)
    for a, b in zip(second, expected, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.va, b.va)
    loader.set_epoch(1, start_batch=2)  # a resumed run's rest of an epoch, on the same pipeline
    assert _rows(list(loader)) == _rows(expected)[2:]
    assert loader._pipe is pipe


def test_validation_passes_reuse_the_pipeline(shard_dir):
    loader = make_loader(shard_dir, "val", batch_size=16, train=False, backend="dali", num_workers=1)
    passes = [_rows(loader) for _ in range(3)]
    pipe = loader._pipe
    it = iter(loader)
    next(it)  # max_val_steps=1
    del it
    assert _rows(loader) == passes[0] == passes[1] == passes[2]
    assert loader._pipe is pipe
    assert sum(len(r) for r in passes[0]) == loader.samples_per_epoch  # the partial last batch included
