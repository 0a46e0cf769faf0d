"""``make_loader``: picks a backend and returns a ``Loader`` (see ``affpipe.loaders.base`` for the
epoch plan and the bad-shard rules both backends follow).

It sits above ``base`` and both backends, so the backends can build on ``base`` without ``base``
knowing them (no import cycle).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from affpipe._optional import dali_available, import_dali
from affpipe.dist import default_workers, dist_env
from affpipe.loaders.augment import AugmentConfig
from affpipe.loaders.base import Loader, LoaderConfig
from affpipe.loaders.dali_backend import DaliLoader
from affpipe.loaders.dali_views import DaliPretrainLoader
from affpipe.loaders.pretrain import PretrainData, PretrainLoader
from affpipe.loaders.torch_backend import TorchLoader
from affpipe.loaders.views import ViewConfig

log = logging.getLogger(__name__)


def make_loader(
    shards: Path,
    split: str,
    *,
    batch_size: int,
    train: bool,
    loader: LoaderConfig | None = None,
    device: str | torch.device = "cpu",
    image_size: int = 112,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    normalize: bool = True,
    parallel: str = "threads",
    **settings,
) -> Loader:
    """A loader over ``shards/<split>`` (see ``affpipe.loaders.base`` for the epoch plan), read as
    ``loader`` (a ``LoaderConfig``: backend, workers, bad-sample rule, augmentation) says;
    ``settings`` override its fields one by one (``backend="torch"``, ``num_workers=0``...).

    ``train`` turns on shuffling, drop-last and the augmentation (``flip_p``, ``max_rotation``
    degrees, nearest-neighbour). ``num_workers``: DALI threads or DataLoader worker processes
    (default: this rank's share of the cores; ``0`` decodes in this process).
    ``normalize=False`` yields ``Batch.images`` as uint8 ``[N,3,H,W]`` (a channels_last view):
    the models normalize uint8 input themselves (``affpipe.models.model``), which keeps a 4x larger
    float copy out of the loader — the trainers use it. ``backend="auto"``: DALI on a CUDA
    device when it is importable (nvJPEG), else the torch backend, whose thread pool needs less
    CPU per frame than DALI's CPU decoder (``affpipe.loaders.threads``). ``parallel``: how the
    torch backend decodes with ``num_workers > 0``: ``"threads"`` or ``"processes"``.
    """
    try:
        cfg = replace(loader or LoaderConfig(), **settings)
    except TypeError as exc:
        raise TypeError(f"make_loader: {exc} (settings are LoaderConfig fields)") from None
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    backend, num_workers, on_bad = cfg.backend, cfg.num_workers, cfg.on_bad
    flip_p, max_rotation = (cfg.flip_p, cfg.max_rotation) if train else (0.5, 10.0)
    if backend == "auto":
        gpu = torch.device(device).type == "cuda"
        backend = "dali" if gpu and dali_available() else "torch"
        # the train loader says it; the val loader, made next with the same choice, stays quiet
        log.log(logging.INFO if train else logging.DEBUG, "loader backend: %s (%s)", backend, "CUDA device, DALI importable" if backend == "dali"
                 else "DALI not importable" if gpu else "CPU device: the torch backend's decode threads")
    aug = AugmentConfig(image_size=image_size, train=train, flip_p=flip_p, max_rotation=max_rotation)
    rank, world = dist_env(rank, world_size)
    workers = default_workers() if num_workers is None else int(num_workers)  # 0: in-process
    kwargs = dict(
        shards=Path(shards), split=split, batch_size=batch_size, aug=aug, device=torch.device(device),
        seed=seed, rank=rank, world=world, num_workers=workers, on_bad=on_bad, normalize=normalize,
    )
    if backend == "dali":
        import_dali()  # a clear ImportError when it is missing
        return DaliLoader(**kwargs)
    return TorchLoader(parallel=parallel, **kwargs)


def make_pretrain_loader(shards: Path, data: PretrainData, *, views: tuple[ViewConfig, ...], batch_size: int,
                         seed: int = 0, backend: str = "torch", device: str | torch.device = "cpu",
                         rank: int | None = None, world_size: int | None = None, num_workers: int | None = None,
                         on_bad: str = "error"):
    """The pre-training loader over ``shards`` (``affpipe.loaders.pretrain``): ``backend="torch"``
    (CPU threads) or ``"dali"`` (``affpipe.loaders.dali_views``; on a CUDA ``device`` the GPU
    decodes and augments)."""
    rank, world = dist_env(rank, world_size)
    workers = default_workers() if num_workers is None else int(num_workers)
    device = torch.device(device)
    if backend == "dali":
        import_dali()  # a clear ImportError when it is missing

        return DaliPretrainLoader(shards, data, views=views, batch_size=batch_size, seed=seed, rank=rank, world=world,
                                  num_workers=workers, device=device)
    if backend != "torch":
        raise ValueError(f"pre-training loader backend must be 'torch' or 'dali', got {backend!r}")
    return PretrainLoader(shards, data, views=views, batch_size=batch_size, seed=seed, rank=rank, world=world,
                          num_workers=workers, on_bad=on_bad, pin_memory=device.type == "cuda")
