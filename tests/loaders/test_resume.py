"""Mid-epoch resume: ``set_epoch(e, start_batch=k)`` yields exactly batches ``k…`` of the
uninterrupted epoch (same samples, same augmentation draws, same pixels) in every backend,
and the backends follow one plan."""

from __future__ import annotations

import pytest
import torch

from affpipe.loaders import make_loader

CASES = [
    pytest.param(dict(backend="torch", parallel="threads"), id="torch-threads"),
    pytest.param(dict(backend="torch", parallel="processes"), id="torch-processes"),
    pytest.param(dict(backend="dali"), id="dali", marks=pytest.mark.dali),
]


def _epoch(loader, epoch: int, start: int = 0) -> list[tuple]:
    loader.set_epoch(epoch, start_batch=start)
    out = []
    for b in loader:
        out.append((b.row_id.clone(), b.images.clone(), b.va.clone(), b.au_mask.clone(),
                    loader.last_augment["flip"].clone(), loader.last_augment["angle"].clone()))
    return out


def _same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            assert torch.equal(u, v)


@pytest.mark.parametrize("kw", CASES)
def test_resumed_batches_equal_uninterrupted(shard_dir, kw):
    loader = make_loader(shard_dir, "train", batch_size=8, train=True, num_workers=2, seed=3, normalize=False, **kw)
    n = len(loader)
    assert n >= 4
    full = _epoch(loader, 2)
    assert len(full) == n
    for k in (1, n // 2, n - 1):
        _same(_epoch(loader, 2, start=k), full[k:])
    assert _epoch(loader, 2, start=n) == []
    _same(_epoch(loader, 2), full)  # the start applies to one iteration only
    assert not torch.equal(_epoch(loader, 3)[0][0], full[0][0])  # another epoch, another order


def test_backends_follow_one_plan(shard_dir):
    """Same rows in the same order and the same draws; pixels as close as two JPEG decoders get."""
    pytest.importorskip("nvidia.dali")
    kw = dict(batch_size=8, train=True, num_workers=2, seed=3, normalize=False)
    torch_b = _epoch(make_loader(shard_dir, "train", backend="torch", **kw), 1)
    dali_b = _epoch(make_loader(shard_dir, "train", backend="dali", **kw), 1)
    for t, d in zip(torch_b, dali_b, strict=True):
        for i in (0, 2, 3, 4, 5):
            assert torch.equal(t[i], d[i])
        assert float((t[1].float() - d[1].float()).abs().mean()) < 1.0


def test_start_batch_out_of_range(shard_dir):
    loader = make_loader(shard_dir, "train", batch_size=8, train=True, backend="torch", num_workers=0)
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=len(loader) + 1)


@pytest.mark.gpu
def test_torch_threads_on_cuda_match_cpu(shard_dir):
    """The decode threads write into page-locked memory on a CUDA device; same batches as on the CPU."""
    kw = dict(batch_size=8, train=True, backend="torch", num_workers=2, seed=3, normalize=False)
    gpu = _epoch(make_loader(shard_dir, "train", device="cuda", **kw), 1)
    cpu = _epoch(make_loader(shard_dir, "train", device="cpu", **kw), 1)
    assert gpu[0][1].is_cuda
    _same([tuple(t.cpu() for t in g) for g in gpu], cpu)
