"""The PyTorch fallback loader: shards read through their ``.idx``, decoded by OpenCV.

Used where DALI is missing (macOS, ARM, Windows), on request, and on CPU-only training. Samples
are read straight from the memory-mapped tars at the offsets the DALI index lists (no tar
parsing, exact per-sample splits and shuffles), decoded with OpenCV (libjpeg-turbo), flip +
rotation warped in one nearest-neighbour ``warpAffine``, and batched as uint8 NHWC; the
training device gets the batch and normalizes it there.

``parallel="threads"`` (default): a thread pool in this process decodes and warps
(``affpipe.loaders.threads``; OpenCV releases the GIL) — the least CPU per frame of the CPU
paths measured. ``parallel="processes"``: DataLoader worker processes, each producing whole
batches (``ShardBatches``, also the careful path that reports or skips bad samples).

Same epoch plan, augmentation semantics and ``Batch`` as the DALI backend (see
``affpipe.loaders.base``); ``set_epoch(e, start_batch=k)`` starts at batch ``k``.
"""

from __future__ import annotations

import gc
import logging
import mmap
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from affpipe.batch import Batch, host_to_device
from affpipe.labels import RECORD_SIZE, record_problems
from affpipe.loaders.augment import AugmentConfig, resize_linear, sample_params, warp_nearest
from affpipe.loaders.base import BaseLoader, Shard
from affpipe.loaders.checks import SKIP_HINT, bad_sample, decode_jpeg
from affpipe.loaders.plan import EpochPlan
from affpipe.loaders.threads import ThreadedBatches
from affpipe.shards.format import parse_idx, sample_key

log = logging.getLogger(__name__)

PARALLEL = ("threads", "processes")  # how num_workers > 0 decode: a thread pool or DataLoader workers


class ShardBatches(Dataset):
    """Item ``(epoch, b)``: batch ``b`` of ``epoch`` on this rank, decoded and augmented.

    Runs in persistent workers; each computes (and caches) the epoch plan itself, so nothing
    but the ``(epoch, b)`` pair crosses the pipe to a worker.
    """

    def __init__(self, shards: list[Shard], plan: EpochPlan, aug: AugmentConfig, on_bad: str,
                 frame_size: tuple[int, int] | None = None) -> None:
        self.shards, self.plan, self.aug, self.on_bad = shards, plan, aug, on_bad
        self.frame_size = frame_size
        self.batch_size = plan.batch_size
        self._maps: dict[int, mmap.mmap] = {}
        self._index: dict[int, list] = {}
        self._epoch: tuple[int, np.ndarray, int] | None = None

    def __len__(self) -> int:
        return self.plan.num_batches

    def epoch(self, epoch: int) -> tuple[np.ndarray, int]:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, *self.plan.samples(epoch))
        return self._epoch[1], self._epoch[2]

    def _open(self, shard: int) -> tuple[mmap.mmap, list]:
        if shard not in self._maps:  # per worker: each opens the tars it reads
            with open(self.shards[shard].tar, "rb") as f:
                self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._index[shard] = parse_idx(self.shards[shard].idx)
        return self._maps[shard], self._index[shard]

    def __getitem__(self, item: tuple[int, int]) -> dict:
        import cv2

        epoch, b = item
        samples, seed = self.epoch(epoch)
        sel = samples[b * self.batch_size:(b + 1) * self.batch_size]
        size = self.aug.image_size
        flips, angles = sample_params(np.random.default_rng([seed, b]), len(sel), self.aug)
        images = np.empty((len(sel), size, size, 3), np.uint8)
        labels = np.empty((len(sel), RECORD_SIZE), np.uint8)
        keep, bad = [], []
        for k, (shard, j) in enumerate(sel):
            mm, index = self._open(int(shard))
            comp = index[int(j)]
            where = _Where(self.shards[int(shard)].tar, comp)  # formatted only into a problem's message
            if "jpg" not in comp or "lbl" not in comp:
                problem = f"{where}: missing member(s) {sorted({'jpg', 'lbl'} - set(comp))}"
            elif comp["lbl"][1] != RECORD_SIZE:
                problem = f"{where}: .lbl has {comp['lbl'][1]} bytes, expected {RECORD_SIZE}"
            else:
                off, n, _ = comp["jpg"]
                img = decode_jpeg(mm, n, off, cv2.IMREAD_COLOR_RGB)
                problem = bad_sample(where, img, n, self.frame_size)
            if problem is not None:
                if self.on_bad != "skip":
                    raise ValueError(f"{problem} ({SKIP_HINT})")
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
        dropped = set()
        for i, why in record_problems(labels[keep]):  # one vectorized range check per batch
            shard, j = sel[keep[i]]
            problem = f"{_Where(self.shards[int(shard)].tar, self._open(int(shard))[1][int(j)])}: {why}"
            if self.on_bad != "skip":
                raise ValueError(f"{problem} ({SKIP_HINT})")
            bad.append(problem)
            dropped.add(keep[i])
        keep = [k for k in keep if k not in dropped]
        if bad:
            images, labels, flips, angles = images[keep], labels[keep], flips[keep], angles[keep]
        return {
            "images": torch.from_numpy(images),
            "labels": torch.from_numpy(labels),
            "flip": torch.from_numpy(flips),
            "angle": torch.from_numpy(angles),
            "bad": bad,
        }


class _Where:
    """``"<tar>: sample <key>"``, built only when a message needs it (not once per sample)."""

    __slots__ = ("tar", "comp")

    def __init__(self, tar, comp) -> None:
        self.tar, self.comp = tar, comp

    def __str__(self) -> str:
        return f"{self.tar}: sample {sample_key(self.comp)}"



class _EpochSampler:
    """Yields ``(epoch, b)`` for the loader's current epoch (read when iteration starts)."""

    def __init__(self, owner: TorchLoader) -> None:
        self.owner = owner

    def __len__(self) -> int:
        return len(self.owner)

    def __iter__(self):
        # DataLoader calls this twice per iteration: read the start the loader took, not take it
        epoch, start = self.owner.epoch, self.owner.iter_start
        return ((epoch, b) for b in range(start, len(self.owner)))


class TorchLoader(BaseLoader):
    """``Loader`` on PyTorch DataLoader workers; see the module docstring."""

    backend = "torch"

    def __init__(self, *, parallel: str = "threads", **kwargs) -> None:
        super().__init__(**kwargs)
        if parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
        self.dataset = ShardBatches(self.shards, self.plan, self.aug, self.on_bad, self.frame_size)
        workers = min(self.num_workers, self.num_batches)
        # Threads (the default) decode in this process: cv2 releases the GIL (affpipe.loaders.threads)
        self.parallel = parallel if workers else "none"  # num_workers=0: decoded on the calling thread
        self.iter_start = 0
        self._threads = (ThreadedBatches(self.dataset, workers, pin_memory=self.device.type == "cuda")
                         if self.parallel == "threads" else None)
        # Workers start per epoch (a fork is cheap; persistent workers took 5 s each to shut
        # down) and compute the epoch's plan themselves from (epoch, b). They are forked: the
        # per-sample OpenCV calls on small images stay single-threaded, so they never touch an
        # OpenCV thread pool the parent may have started (calling cv2.setNumThreads in a forked
        # child whose parent used the pool deadlocks).
        self._loader = None if self._threads is not None else DataLoader(
            self.dataset, batch_size=None, sampler=_EpochSampler(self), num_workers=workers,
            prefetch_factor=4 if workers else None,
            pin_memory=self.device.type == "cuda",
        )

    def _items(self) -> Iterator[dict]:
        self.iter_start = self.take_start_batch()
        if self._threads is None:
            # Collect dead objects here, before the fork: a DALI pipeline that is garbage in the
            # parent would otherwise be finalized by a forked worker's collector, whose
            # Pipeline.__del__ waits forever for DALI threads that do not exist in the child.
            gc.collect()
            return iter(self._loader)  # its sampler starts at iter_start
        return self._threads.iterate(self.epoch, self.iter_start, len(self))

    def close(self) -> None:
        """Stop the decode threads now (they also stop when the loader is garbage-collected)."""
        if self._threads is not None:
            self._threads.close()

    def __iter__(self) -> Iterator[Batch]:
        for item in self._items():
            if item["bad"]:
                for problem in item["bad"]:
                    log.warning("%s; skipped", problem)
                self._count({"bad_sample": len(item["bad"])})
            if not len(item["labels"]):
                continue
            # through page-locked memory to a GPU (the decode threads write images there already)
            images = host_to_device(item["images"], self.device)
            self.last_augment = {"flip": item["flip"], "angle": item["angle"]}
            yield self.finish(images, host_to_device(item["labels"], self.device))
