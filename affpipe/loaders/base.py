"""Loaders: WebDataset shards → ``Batch``, through DALI or a PyTorch fallback.

``make_loader`` (``affpipe.loaders.factory``) picks the backend (``auto``: DALI on a CUDA device
when importable, else torch), validates the shards and returns a ``Loader``: iterable of ``Batch`` (float normalized images on
``device``), ``len()`` = batches per epoch on this rank, ``set_epoch(e, start_batch=0)`` to
reshuffle (and start mid-epoch without decoding the batches before), ``samples_per_epoch``
(samples this rank yields per epoch), ``backend``, ``skipped`` (bad samples skipped, by reason)
and ``last_augment`` (the previous batch's per-sample ``flip``/``angle``, for debugging/tests).

Epoch plan (``affpipe.loaders.plan``; both backends follow it, so they yield the same samples in
the same order with the same augmentation draws, and batch ``k`` can be made without the ones
before it):

* The split's shards are concatenated in manifest order (val) or in a seeded per-epoch
  permutation of whole shards (train). The concatenation is cut into ``world_size`` contiguous
  ranges, rank ``r`` reading ``[r*N//W, (r+1)*N//W)`` — DALI's own ``shard_id``/``num_shards``
  rule. With many shards that is a shard-level split (each rank streams whole tars, cut at most
  at its two ends); with few shards it degrades gracefully to a sample-level split.
* Train: samples are shuffled within the rank's range every epoch (a seeded block shuffle);
  the train split was also shuffled globally when it was written. Batch ``b``'s flips and angles
  are drawn from a generator seeded by ``(epoch seed, b)``.
  Each rank yields exactly ``(N // W) // batch_size`` full batches — the same count on every
  rank, so DDP never waits on a rank that ran out — and the remaining few samples of the epoch
  are dropped (different ones each epoch). Too few samples for one batch is an error.
* Val (``train=False``): no shuffling, every sample exactly once: rank ``r`` yields its range
  in order, ``ceil(n_r / batch_size)`` batches, the last one partial. Ranks may differ by one
  batch; evaluation gathers metrics at the end, it has no per-batch collective.

Bad shards: a missing ``.idx``, a truncated tar (the index points past its end) or a malformed
index raise ``ValueError`` naming the shard (and the first key lost) when the loader is made.
Bad samples (:mod:`affpipe.loaders.checks`: an empty or undecodable JPEG, a frame of another
size than the split's recorded ``frame_size`` — never squashed —, a label record out of range)
raise naming the shard and key while iterating. With ``on_bad="skip"`` missing/truncated shards
lose only the unreadable samples, zero-byte JPEGs are left out of the index, and a bad sample is
dropped from its batch; ``loader.skipped`` counts what was skipped. The DALI backend cannot drop
a sample inside its decoder: an undecodable (non-empty) JPEG is always an error there (the
message names shard and key and suggests ``backend="torch", on_bad="skip"``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from affpipe.batch import Batch
from affpipe.loaders.checks import SKIP_HINT, empty_jpegs
from affpipe.loaders.plan import EpochCursor, EpochPlan, rank_range
from affpipe.shards.format import (
    MANIFEST,
    idx_last_end,
    parse_idx,
    read_idx_header,
    sample_key,
    shard_paths,
    split_frame_size,
    write_idx_lines,
)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dali", "torch")
ON_BAD = ("error", "skip")


@dataclass(frozen=True)
class LoaderConfig:
    """How a command reads shards (the ``[loader]`` section of a recipe; train, evaluate,
    predict and the benchmarks share it). ``flip_p`` and ``max_rotation`` apply to training
    only; ``num_workers=None`` is this rank's share of the usable cores."""

    backend: str = "auto"  # auto | dali | torch
    num_workers: int | None = None
    on_bad: str = "error"  # error | skip (undecodable images, bad records, truncated shards)
    flip_p: float = 0.5
    max_rotation: float = 10.0  # degrees

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"loader.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.on_bad not in ON_BAD:
            raise ValueError(f"loader.on_bad must be one of {ON_BAD}, got {self.on_bad!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"loader.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"loader.flip_p must be in [0, 1], got {self.flip_p}")
        if not 0.0 <= self.max_rotation <= 180.0:
            raise ValueError(f"loader.max_rotation must be in [0, 180] degrees, got {self.max_rotation}")

    def kwargs(self, train: bool) -> dict:
        """``make_loader`` keyword arguments (augmentation settings only for ``train``)."""
        out = {"backend": self.backend, "num_workers": self.num_workers, "on_bad": self.on_bad}
        if train:
            out.update(flip_p=self.flip_p, max_rotation=self.max_rotation)
        return out


@runtime_checkable
class Loader(Protocol):
    """What the trainers rely on; both backends implement it."""

    backend: str
    samples_per_epoch: int

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


# ---- shards --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One readable tar: ``idx`` may be a trimmed copy (``on_bad="skip"`` on a truncated tar)."""

    tar: Path
    idx: Path
    samples: int





def check_shard(tar: Path, idx: Path, on_bad: str, tmp: Path | None) -> tuple[Shard | None, dict[str, int]]:
    """Validate one (tar, idx) pair; with ``on_bad="skip"`` a trimmed shard and what was lost."""
    if not tar.is_file():
        if on_bad == "skip":
            log.warning("%s: shard missing; skipped", tar)
            return None, {"missing_shard": 1}
        raise ValueError(f"{tar}: shard file missing (rewrite it with `affpipe shard`)")
    if not idx.is_file():
        if on_bad == "skip":
            log.warning("%s: index %s missing; shard skipped", tar, idx.name)
            return None, {"missing_idx_shards": 1}
        raise ValueError(f"{tar}: its DALI index {idx} is missing (run `wds2idx {tar} {idx}` or reshard)")
    try:
        _, n = read_idx_header(idx)
        last_end = idx_last_end(idx)
    except ValueError as exc:
        if on_bad == "skip":
            log.warning("%s: %s; shard skipped", tar, exc)
            return None, {"bad_idx_shards": 1}
        raise ValueError(f"{tar}: {exc} (reshard, or {SKIP_HINT})") from None
    size = tar.stat().st_size
    if last_end <= size:
        if on_bad == "skip" and (empty := empty_jpegs(idx)):  # shards from before they were caught at shard time
            return _without(tar, idx, tmp, empty)
        return Shard(tar, idx, n), {}
    samples = parse_idx(idx)
    good = [s for s in samples if all(off + sz <= size for off, sz, _ in s.values())]
    first_lost = sample_key(samples[len(good)]) if len(good) < len(samples) else "?"
    msg = (f"{tar}: truncated ({size} bytes) — sample {first_lost} and {len(samples) - len(good) - 1} "
           f"more lie past its end")
    if on_bad != "skip":
        raise ValueError(msg + f"; rewrite the shard (`affpipe shard` resumes) or {SKIP_HINT}")
    log.warning("%s; skipped them", msg)
    if not good:
        return None, {"truncated": len(samples)}
    assert tmp is not None
    trimmed = tmp / f"{len(list(tmp.iterdir()))}-{idx.name}"
    with open(idx, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()[1:]
    write_idx_lines(trimmed, [line + "\n" for line in lines[: len(good)]])
    return Shard(tar, trimmed, len(good)), {"truncated": len(samples) - len(good)}


def _without(tar: Path, idx: Path, tmp: Path | None, drop: set[int]) -> tuple[Shard | None, dict[str, int]]:
    """A copy of ``idx`` without the samples in ``drop`` (zero-byte JPEGs, ``on_bad="skip"``)."""
    samples = parse_idx(idx)
    for i in sorted(drop)[:5]:
        log.warning("%s: sample %s: empty JPEG (0 bytes); skipped", tar, sample_key(samples[i]))
    with open(idx, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()[1:]
    keep = [line + "\n" for i, line in enumerate(lines[: len(samples)]) if i not in drop]
    if not keep:
        return None, {"empty_jpeg": len(drop)}
    assert tmp is not None
    trimmed = tmp / f"{len(list(tmp.iterdir()))}-{idx.name}"
    write_idx_lines(trimmed, keep)
    return Shard(tar, trimmed, len(keep)), {"empty_jpeg": len(drop)}


def find_shards(shards: Path, split: str) -> list[tuple[Path, Path]]:
    """``(tar, idx)`` pairs of ``split``: from the manifest when there is one, else
    ``shards/<split>/*.tar`` with ``.idx`` beside each."""
    shards = Path(shards)
    if (shards / MANIFEST).is_file():
        return shard_paths(shards, split)
    tars = sorted((shards / split).glob("*.tar"))
    if not tars:
        raise ValueError(f"{shards}: no manifest.json and no {split}/*.tar shards")
    return [(t, t.with_suffix(".idx")) for t in tars]


class BaseLoader(EpochCursor):
    """Shard validation, the epoch plan and the bookkeeping both backends share (epochs and
    mid-epoch starts: ``EpochCursor``)."""

    backend = "base"

    def __init__(self, *, shards: Path, split: str, batch_size: int, aug, device: torch.device, seed: int,
                 rank: int, world: int, num_workers: int, on_bad: str, normalize: bool = True) -> None:
        import tempfile

        self.split, self.batch_size, self.aug, self.device = split, batch_size, aug, device
        self.seed, self.rank, self.world, self.num_workers, self.on_bad = seed, rank, world, num_workers, on_bad
        self.train = aug.train
        self.normalize = normalize
        self.epoch = 0
        self.skipped: dict[str, int] = {}
        self.last_augment: dict[str, torch.Tensor] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="affpipe-idx-") if on_bad == "skip" else None
        self.shards: list[Shard] = []
        for tar, idx in find_shards(shards, split):
            shard, lost = check_shard(Path(tar), Path(idx), on_bad, Path(self._tmp.name) if self._tmp else None)
            self._count(lost)
            if shard is not None and shard.samples:
                self.shards.append(shard)
        self.total = sum(s.samples for s in self.shards)
        # The size every frame of the split has (None: shards from before it was recorded); a
        # frame of another size is a bad sample, never silently squashed.
        self.frame_size = split_frame_size(shards, split)
        start, stop = rank_range(self.total, rank, world)
        self.rank_samples = stop - start
        if self.train:
            self.num_batches = (self.total // world) // batch_size
            if self.num_batches == 0:
                raise ValueError(
                    f"{shards}/{split}: {self.total} samples over {world} rank(s) do not fill one batch "
                    f"of {batch_size} (train drops the last partial batch); use a smaller batch_size"
                )
            self.samples_per_epoch = self.num_batches * batch_size
        else:
            self.num_batches = -(-self.rank_samples // batch_size)
            self.samples_per_epoch = self.rank_samples
        # The epoch plan both backends follow (affpipe.loaders.plan)
        self.plan = EpochPlan(tuple(s.samples for s in self.shards), seed, rank, world, self.train, batch_size,
                              self.num_batches)
        self._start_batch = 0
        self._index_cache: dict[int, list] = {}

    def finish(self, images: torch.Tensor, raw: torch.Tensor, *, reused: bool = False) -> Batch:
        """The ``Batch`` of uint8 NHWC ``images``. ``reused``: the memory is a buffer the
        source overwrites later (DALI's output), so a uint8 batch must copy it; normalizing
        writes new memory anyway, so the copy is made only when it is needed."""
        from affpipe.batch import make_batch, normalize_uint8

        if self.normalize:
            return make_batch(normalize_uint8(images, channels_last=True), raw)
        return make_batch((images.clone() if reused else images).permute(0, 3, 1, 2), raw)

    def _count(self, lost: dict[str, int]) -> None:
        for k, v in lost.items():
            self.skipped[k] = self.skipped.get(k, 0) + v

    def __len__(self) -> int:
        return self.num_batches

    def shard_index(self, shard_i: int) -> list:
        """The parsed ``.idx`` of shard ``shard_i`` (parsed once, for naming bad samples)."""
        if shard_i not in self._index_cache:
            self._index_cache[shard_i] = parse_idx(self.shards[shard_i].idx)
        return self._index_cache[shard_i]

    def sample_name(self, shard_i: int, j: int) -> str:
        """The key of sample ``j`` of shard ``shard_i`` (for messages)."""
        return sample_key(self.shard_index(shard_i)[j])

    def batch_rows(self) -> list:
        """The row ids of each batch of this rank's pass over the current epoch, from the shards'
        keys (zero-padded row ids): nothing is decoded. What picks limited validation batches."""
        import numpy as np

        samples, _ = self.plan.samples(self.epoch)
        keys = [np.array([int(sample_key(e)) for e in self.shard_index(i)[:s.samples]], np.int64)
                for i, s in enumerate(self.shards)]
        rows = np.empty(len(samples), np.int64)
        for shard in np.unique(samples[:, 0]):
            at = np.nonzero(samples[:, 0] == shard)[0]
            rows[at] = keys[int(shard)][samples[at, 1]]
        return [rows[b * self.batch_size:(b + 1) * self.batch_size] for b in range(self.num_batches)]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, shards={len(self.shards)}, samples={self.total}, "
                f"rank={self.rank}/{self.world}, batches={self.num_batches}, train={self.train})")
