"""The epoch plan both loader backends follow (see ``affpipe.loaders`` for the rules).

Pure functions of (shard sample counts, seed, epoch, rank, world): which samples a rank yields
in an epoch, in which order, and the seed of its augmentation draws. Both backends read the
plan's samples themselves (``affpipe.loaders.source``), so batch ``k`` of an epoch needs none of
the batches before it (mid-epoch resume). The rank cut is DALI's ``shard_id``/``num_shards`` rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def rank_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of rank ``rank`` (DALI's ``shard_id``/``num_shards`` rule)."""
    return total * rank // world, total * (rank + 1) // world


def shard_order(n: int, seed: int, epoch: int, train: bool) -> list[int]:
    """Shard order of an epoch: seeded permutation (train) or manifest order (val)."""
    if not train:
        return list(range(n))
    return [int(i) for i in np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A per-(seed, epoch, rank) seed for shuffling and augmentation draws."""
    return int(np.random.default_rng([seed, epoch, rank]).integers(0, 2**31 - 1))


SHUFFLE_BLOCK = 256  # contiguous samples kept together so reads stay mostly sequential
SHUFFLE_WINDOW = 64  # blocks shuffled together (~16k samples, a shuffle buffer's reach)


def epoch_samples(counts: list[int], order: list[int], rank: int, world: int) -> np.ndarray:
    """``[n_r, 2]`` int64 (shard, sample-in-shard) of this rank's range of the concatenation of
    the shards in ``order`` (the same cut DALI makes with ``shard_id``/``num_shards``)."""
    sizes = np.array([counts[i] for i in order], np.int64)
    ends = np.cumsum(sizes)
    start, stop = rank_range(int(ends[-1]) if len(ends) else 0, rank, world)
    out = []
    for pos, shard in enumerate(order):
        lo, hi = int(ends[pos] - sizes[pos]), int(ends[pos])
        a, b = max(lo, start), min(hi, stop)
        if a < b:
            out.append(np.stack([np.full(b - a, shard, np.int64), np.arange(a - lo, b - lo, dtype=np.int64)], 1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def block_shuffle(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(n)`` that moves blocks of ``SHUFFLE_BLOCK`` and then shuffles
    samples within windows of ``SHUFFLE_WINDOW`` blocks: well mixed, yet each window touches
    only a few regions of the tars."""
    blocks = np.arange(-(-n // SHUFFLE_BLOCK))
    rng.shuffle(blocks)
    perm = (blocks[:, None] * SHUFFLE_BLOCK + np.arange(SHUFFLE_BLOCK)[None, :]).reshape(-1)
    perm = perm[perm < n]
    win = SHUFFLE_BLOCK * SHUFFLE_WINDOW
    for s in range(0, n, win):
        rng.shuffle(perm[s:s + win])
    return perm


@dataclass(frozen=True)
class EpochPlan:
    """Everything a worker needs to compute any epoch's batches on its own (picklable)."""

    counts: tuple[int, ...]
    seed: int
    rank: int
    world: int
    train: bool
    batch_size: int
    num_batches: int

    def samples(self, epoch: int) -> tuple[np.ndarray, int]:
        """``([n, 2] (shard, sample) in yield order, augmentation seed)`` of ``epoch``."""
        order = shard_order(len(self.counts), self.seed, epoch, self.train)
        samples = epoch_samples(list(self.counts), order, self.rank, self.world)
        seed = epoch_seed(self.seed, epoch, self.rank)
        if self.train:
            samples = samples[block_shuffle(len(samples), np.random.default_rng([seed, 1]))]
            samples = samples[: self.num_batches * self.batch_size]
        return samples, seed


class EpochCursor:
    """Which epoch a loader plays and the batch its next pass starts at: the one mechanism the
    shard loaders and the feature-window loader share (``set_epoch(e, start_batch=k)``; a
    resumed run's rest of an epoch). Subclasses set ``num_batches`` and call
    ``take_start_batch()`` when a pass begins."""

    epoch: int = 0
    num_batches: int = 0
    _start_batch: int = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use epoch ``epoch``'s order (shuffle and augmentation draws).

        ``start_batch=k``: the next iteration starts at batch ``k`` of the epoch and yields the
        same batches as batches ``k, k+1, …`` of an uninterrupted pass, without reading or
        building batches ``0..k-1``. Later iterations start at batch 0 again.
        """
        if not 0 <= int(start_batch) <= self.num_batches:
            raise ValueError(f"start_batch must be in [0, {self.num_batches}], got {start_batch}")
        self.epoch = int(epoch)
        self._start_batch = int(start_batch)

    def take_start_batch(self) -> int:
        """The batch the iteration beginning now starts at (consumed: the next one starts at 0)."""
        start, self._start_batch = self._start_batch, 0
        return start
