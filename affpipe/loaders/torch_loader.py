"""The PyTorch fallback loader: shards read through their ``.idx`` + DataLoader workers.

Used where DALI is missing (macOS, ARM, Windows) or on request. Each worker produces whole
batches: it reads the samples of its batch straight from the memory-mapped tars at the
offsets the DALI index lists (no tar parsing, exact per-sample splits and shuffles), decodes
with OpenCV (libjpeg-turbo), warps flip + rotation in one nearest-neighbour ``warpAffine``
and returns a uint8 NHWC batch (4x fewer bytes through the worker pipe than float). The
main process moves it to the device and normalizes it there.

Same epoch plan, augmentation semantics and ``Batch`` as the DALI backend (see
``affpipe.loaders``).
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from affpipe.augment import AugmentConfig, resize_linear, sample_params, warp_nearest
from affpipe.batch import Batch, make_batch, normalize_uint8
from affpipe.labels import RECORD_SIZE
from affpipe.loaders import BaseLoader, Shard, parse_idx, rank_range, sample_key

log = logging.getLogger(__name__)

SHUFFLE_BLOCK = 256  # contiguous samples kept together so reads stay mostly sequential
SHUFFLE_WINDOW = 64  # blocks shuffled together (~16k samples, like DALI's shuffle buffer)


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


class EpochBatches(Dataset):
    """Batch ``b`` of one epoch of one rank, decoded and augmented (runs in a worker)."""

    def __init__(self, shards: list[Shard], samples: np.ndarray, batch_size: int, aug: AugmentConfig,
                 seed: int, on_bad: str) -> None:
        self.shards, self.samples, self.batch_size = shards, samples, batch_size
        self.aug, self.seed, self.on_bad = aug, seed, on_bad
        self._maps: dict[int, mmap.mmap] = {}
        self._index: dict[int, list] = {}

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def _open(self, shard: int) -> tuple[mmap.mmap, list]:
        if shard not in self._maps:  # per worker: the dataset is copied into each one
            with open(self.shards[shard].tar, "rb") as f:
                self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._index[shard] = parse_idx(self.shards[shard].idx)
        return self._maps[shard], self._index[shard]

    def __getitem__(self, b: int) -> dict:
        import cv2

        sel = self.samples[b * self.batch_size:(b + 1) * self.batch_size]
        size = self.aug.image_size
        flips, angles = sample_params(np.random.default_rng([self.seed, b]), len(sel), self.aug)
        images = np.empty((len(sel), size, size, 3), np.uint8)
        labels = np.empty((len(sel), RECORD_SIZE), np.uint8)
        keep, bad = [], []
        for k, (shard, j) in enumerate(sel):
            mm, index = self._open(int(shard))
            comp = index[int(j)]
            where = f"{self.shards[int(shard)].tar}: sample {sample_key(comp)}"
            if "jpg" not in comp or "lbl" not in comp:
                problem = f"{where}: missing member(s) {sorted({'jpg', 'lbl'} - set(comp))}"
            elif comp["lbl"][1] != RECORD_SIZE:
                problem = f"{where}: .lbl has {comp['lbl'][1]} bytes, expected {RECORD_SIZE}"
            else:
                off, n, _ = comp["jpg"]
                img = cv2.imdecode(np.frombuffer(mm, np.uint8, n, off), cv2.IMREAD_COLOR_RGB)
                problem = None if img is not None else f"{where}: undecodable JPEG ({n} bytes)"
            if problem is not None:
                if self.on_bad != "skip":
                    raise ValueError(problem + " (pass on_bad='skip' to skip bad samples)")
                bad.append(problem)
                continue
            img = resize_linear(img, size)
            if self.aug.augments:
                warp_nearest(img, float(angles[k]), bool(flips[k]), out=images[k])
            else:
                images[k] = img
            off, n, _ = comp["lbl"]
            labels[k] = np.frombuffer(mm, np.uint8, n, off)
            keep.append(k)
        if bad:
            images, labels, flips, angles = images[keep], labels[keep], flips[keep], angles[keep]
        return {
            "images": torch.from_numpy(images),
            "labels": torch.from_numpy(labels),
            "flip": torch.from_numpy(flips),
            "angle": torch.from_numpy(angles),
            "bad": bad,
        }


def _worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; OpenCV's own pool would oversubscribe


class TorchLoader(BaseLoader):
    """``Loader`` on PyTorch DataLoader workers; see the module docstring."""

    backend = "torch"

    def epoch_dataset(self, epoch: int) -> EpochBatches:
        """The batches this rank yields in ``epoch`` (also used by tests to inspect the plan)."""
        samples = epoch_samples([s.samples for s in self.shards], self.shard_order(epoch), self.rank, self.world)
        seed = self.epoch_seed(epoch)
        if self.train:
            samples = samples[block_shuffle(len(samples), np.random.default_rng([seed, 1]))]
            samples = samples[: self.num_batches * self.batch_size]
        return EpochBatches(self.shards, samples, self.batch_size, self.aug, seed, self.on_bad)

    def __iter__(self) -> Iterator[Batch]:
        data = self.epoch_dataset(self.epoch)
        workers = min(self.num_workers, len(data))
        loader = DataLoader(
            data, batch_size=None, shuffle=False, num_workers=workers,
            prefetch_factor=4 if workers else None, worker_init_fn=_worker_init if workers else None,
            pin_memory=self.device.type == "cuda",
        )
        for item in loader:
            if item["bad"]:
                for problem in item["bad"]:
                    log.warning("%s; skipped", problem)
                self._count({"bad_sample": len(item["bad"])})
            if not len(item["labels"]):
                continue
            images = item["images"].to(self.device, non_blocking=True)
            self.last_augment = {"flip": item["flip"], "angle": item["angle"]}
            yield make_batch(
                normalize_uint8(images, channels_last=True),
                item["labels"].to(self.device, non_blocking=True),
            )
