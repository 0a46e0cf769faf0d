"""Loaders: WebDataset shards → ``Batch``, through DALI or a PyTorch fallback.

``make_loader`` (``affpipe.loaders.factory``) picks the backend; both backends build on
``affpipe.loaders.base`` and apply the epoch plan of ``affpipe.loaders.plan``;
``affpipe.loaders.augment`` holds the train-time augmentation both backends share.
"""

from affpipe.loaders.augment import AugmentConfig
from affpipe.loaders.base import (
    BACKENDS,
    ON_BAD,
    BaseLoader,
    Loader,
    LoaderConfig,
    Shard,
    check_shard,
    find_shards,
)
from affpipe.loaders.factory import make_loader, make_pretrain_loader
from affpipe.loaders.plan import EpochPlan, epoch_samples, epoch_seed, rank_range, shard_order
from affpipe.loaders.pretrain import PretrainData, PretrainLoader, ViewBatch, describe_data
from affpipe.loaders.views import ViewConfig

__all__ = [
    "BACKENDS", "ON_BAD", "AugmentConfig", "BaseLoader", "LoaderConfig", "EpochPlan", "Loader", "Shard", "check_shard",
    "epoch_samples", "epoch_seed", "find_shards", "make_loader", "rank_range", "shard_order",
    "make_pretrain_loader", "PretrainData", "PretrainLoader", "ViewBatch", "ViewConfig", "describe_data",
]
