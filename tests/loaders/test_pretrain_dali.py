"""The DALI pre-training loader follows the threads' plan and draws (CPU operators here; GPU marked)."""

from __future__ import annotations

import pytest
import torch

from affpipe.loaders.factory import make_pretrain_loader
from affpipe.loaders.pretrain import PretrainData, PretrainLoader
from affpipe.loaders.views import ViewConfig

pytestmark = pytest.mark.dali

GEOMETRY = (ViewConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),) * 2
FULL = (ViewConfig(), ViewConfig(blur_p=1.0))


def _batches(loader, start: int = 0):
    loader.set_epoch(1, start_batch=start)
    return [([v.clone() for v in b.views], b.row_id.clone()) for b in loader]


@pytest.mark.parametrize("views", [GEOMETRY, FULL], ids=["geometry", "colour+blur"])
def test_dali_cpu_views_match_the_threads_views(shard_dir, views):
    threads = PretrainLoader(shard_dir, PretrainData(), views=views, batch_size=16, seed=3, num_workers=1)
    dali = make_pretrain_loader(shard_dir, PretrainData(), views=views, batch_size=16, seed=3, backend="dali",
                                num_workers=1)
    a, d = _batches(threads), _batches(dali)
    assert len(a) == len(d) == len(threads) > 0
    for (va, ra), (vd, rd) in zip(a, d, strict=True):
        assert torch.equal(ra, rd)  # the same frames in the same order
        for x, y in zip(va, vd, strict=True):
            assert x.shape == y.shape and y.dtype == torch.uint8
            assert (x.float() - y.float()).abs().mean() < 1.0  # same crops, flips, colours: filter rounding only
    rest = _batches(dali, start=2)  # resume at batch k
    assert len(rest) == len(d) - 2
    assert all(torch.equal(x, y) for (vx, _), (vy, _) in zip(d[2:], rest, strict=True) for x, y in zip(vx, vy, strict=True))
    threads.close(), dali.close()


def test_dali_refuses_solarization(shard_dir):
    with pytest.raises(ValueError, match="solarization"):
        make_pretrain_loader(shard_dir, PretrainData(), views=(ViewConfig(solarize_p=0.2),) * 2, batch_size=8,
                             backend="dali")


@pytest.mark.gpu
def test_dali_gpu_views_match_the_cpu_ones(shard_dir):
    cpu = make_pretrain_loader(shard_dir, PretrainData(), views=FULL, batch_size=16, seed=3, backend="dali")
    gpu = make_pretrain_loader(shard_dir, PretrainData(), views=FULL, batch_size=16, seed=3, backend="dali",
                               device="cuda")
    for (vc, rc), (vg, rg) in zip(_batches(cpu), _batches(gpu), strict=True):
        assert torch.equal(rc, rg)
        for x, y in zip(vc, vg, strict=True):
            assert y.is_cuda and (x.float() - y.cpu().float()).abs().mean() < 2.0  # nvJPEG's IDCT rounds differently
