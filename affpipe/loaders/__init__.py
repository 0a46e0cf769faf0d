"""Loaders: WebDataset shards → ``Batch``, through DALI or a PyTorch fallback.

``make_loader`` picks the backend (``auto``: DALI when importable, else torch), validates the
shards and returns a ``Loader``: iterable of ``Batch`` (float normalized images on ``device``),
``len()`` = batches per epoch on this rank, ``set_epoch(e)`` to reshuffle, ``samples_per_epoch``
(samples this rank yields per epoch), ``backend``, ``skipped`` (bad samples skipped, by reason)
and ``last_augment`` (the previous batch's per-sample ``flip``/``angle``, for debugging/tests).

Epoch plan (identical in both backends, so they yield the same samples):

* The split's shards are concatenated in manifest order (val) or in a seeded per-epoch
  permutation of whole shards (train). The concatenation is cut into ``world_size`` contiguous
  ranges, rank ``r`` reading ``[r*N//W, (r+1)*N//W)`` — DALI's own ``shard_id``/``num_shards``
  rule. With many shards that is a shard-level split (each rank streams whole tars, cut at most
  at its two ends); with few shards it degrades gracefully to a sample-level split.
* Train: samples are shuffled within the rank's range every epoch (DALI: its shuffle buffer;
  torch: seeded block shuffle); the train split was also shuffled globally when it was written.
  Each rank yields exactly ``(N // W) // batch_size`` full batches — the same count on every
  rank, so DDP never waits on a rank that ran out — and the remaining few samples of the epoch
  are dropped (different ones each epoch). Too few samples for one batch is an error.
* Val (``train=False``): no shuffling, every sample exactly once: rank ``r`` yields its range
  in order, ``ceil(n_r / batch_size)`` batches, the last one partial. Ranks may differ by one
  batch; evaluation gathers metrics at the end, it has no per-batch collective.

Bad shards: a missing ``.idx``, a truncated tar (the index points past its end) or a malformed
index raise ``ValueError`` naming the shard (and the first key lost) when the loader is made;
an undecodable JPEG raises naming the shard and key while iterating. With ``on_bad="skip"``
missing/truncated shards lose only the unreadable samples and an undecodable image is dropped
from its batch (torch backend); ``loader.skipped`` counts what was skipped. The DALI backend
cannot drop a sample inside its decoder: an undecodable JPEG is always an error there (the
message names shard and key and suggests ``backend="torch", on_bad="skip"``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from affpipe.batch import Batch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dali", "torch")
ON_BAD = ("error", "skip")


@runtime_checkable
class Loader(Protocol):
    """What the trainers rely on; both backends implement it."""

    backend: str
    samples_per_epoch: int

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


# ---- distributed ---------------------------------------------------------------------------


def dist_env(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the arguments when given, else torchrun's ``RANK``/``WORLD_SIZE``."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, world_size={world})")
    return rank, world


def default_workers() -> int:
    """CPU threads/processes for one rank: the cores this process may use, split over the
    ranks of this node (``LOCAL_WORLD_SIZE``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def rank_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of rank ``rank`` (DALI's ``shard_id``/``num_shards`` rule)."""
    return total * rank // world, total * (rank + 1) // world


# ---- shards --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One readable tar: ``idx`` may be a trimmed copy (``on_bad="skip"`` on a truncated tar)."""

    tar: Path
    idx: Path
    samples: int


def _read_idx_header(idx: Path) -> tuple[str, int]:
    with open(idx, "rb") as f:
        head = f.readline().decode("ascii", "replace").split()
    if len(head) != 2 or not head[0].startswith("v1.") or not head[1].isdigit():
        raise ValueError(f"{idx}:1: not a DALI webdataset index (expected 'v1.2 <samples>')")
    return head[0], int(head[1])


def parse_idx(idx: Path) -> list[dict[str, tuple[int, int, str]]]:
    """Every sample of an index: ``{ext: (offset, size, member name)}`` per sample."""
    version, n = _read_idx_header(idx)
    step = 4 if version >= "v1.2" else 3
    samples = []
    with open(idx, encoding="utf-8") as f:
        next(f)
        for lineno, line in enumerate(f, start=2):
            tok = line.split()
            if not tok:
                continue
            if len(tok) % step:
                raise ValueError(f"{idx}:{lineno}: malformed index line ({len(tok)} fields)")
            try:
                comp = {
                    tok[i]: (int(tok[i + 1]), int(tok[i + 2]), tok[i + 3] if step == 4 else f"#{len(samples)}.{tok[i]}")
                    for i in range(0, len(tok), step)
                }
            except ValueError:
                raise ValueError(f"{idx}:{lineno}: malformed index line (non-numeric offset/size)") from None
            samples.append(comp)
    if len(samples) != n:
        raise ValueError(f"{idx}:1: header says {n} samples, the index lists {len(samples)}")
    return samples


def sample_key(comp: dict[str, tuple[int, int, str]]) -> str:
    """The sample's key (member name without extension)."""
    name = next(iter(comp.values()))[2]
    return name.split(".", 1)[0].rsplit("/", 1)[-1]


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
    _, n = _read_idx_header(idx)
    size = tar.stat().st_size
    with open(idx, "rb") as f:  # the last sample ends last: read only the index's tail
        f.seek(max(0, idx.stat().st_size - 65536))
        tail = f.read().decode("utf-8", "replace").strip().splitlines()
    last_end = 0
    if n and len(tail) > 0:
        tok = tail[-1].split()
        step = 4 if len(tok) % 4 == 0 else 3
        last_end = max(int(tok[i + 1]) + int(tok[i + 2]) for i in range(0, len(tok), step))
    if last_end <= size:
        return Shard(tar, idx, n), {}
    samples = parse_idx(idx)
    good = [s for s in samples if all(off + sz <= size for off, sz, _ in s.values())]
    first_lost = sample_key(samples[len(good)]) if len(good) < len(samples) else "?"
    msg = (f"{tar}: truncated ({size} bytes) — sample {first_lost} and {len(samples) - len(good) - 1} "
           f"more lie past its end")
    if on_bad != "skip":
        raise ValueError(msg + "; rewrite the shard (`affpipe shard` resumes) or pass on_bad='skip'")
    log.warning("%s; skipped them", msg)
    if not good:
        return None, {"truncated": len(samples)}
    assert tmp is not None
    trimmed = tmp / f"{len(list(tmp.iterdir()))}-{idx.name}"
    with open(idx, encoding="utf-8") as f:
        lines = f.read().splitlines()[1:]
    trimmed.write_text(f"v1.2 {len(good)}\n" + "\n".join(lines[: len(good)]) + "\n")
    return Shard(tar, trimmed, len(good)), {"truncated": len(samples) - len(good)}


def find_shards(shards: Path, split: str) -> list[tuple[Path, Path]]:
    """``(tar, idx)`` pairs of ``split``: from the manifest when there is one, else
    ``shards/<split>/*.tar`` with ``.idx`` beside each."""
    shards = Path(shards)
    if (shards / "manifest.json").is_file():
        from affpipe.shards import shard_paths

        return shard_paths(shards, split)
    tars = sorted((shards / split).glob("*.tar"))
    if not tars:
        raise ValueError(f"{shards}: no manifest.json and no {split}/*.tar shards")
    return [(t, t.with_suffix(".idx")) for t in tars]


def shard_order(n: int, seed: int, epoch: int, train: bool) -> list[int]:
    """Shard order of an epoch: seeded permutation (train) or manifest order (val)."""
    if not train:
        return list(range(n))
    return [int(i) for i in np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A per-(seed, epoch, rank) seed for shuffling and augmentation draws."""
    return int(np.random.default_rng([seed, epoch, rank]).integers(0, 2**31 - 1))


# ---- the loader factory --------------------------------------------------------------------


def make_loader(
    shards: Path,
    split: str,
    *,
    batch_size: int,
    train: bool,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    image_size: int = 112,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int | None = None,
    flip_p: float = 0.5,
    max_rotation: float = 10.0,
    on_bad: str = "error",
    normalize: bool = True,
) -> Loader:
    """A loader over ``shards/<split>`` (see the module docstring for the epoch plan).

    ``train`` turns on shuffling, drop-last and the augmentation (``flip_p``,
    ``max_rotation`` degrees, nearest-neighbour). ``num_workers``: DALI threads or DataLoader
    worker processes (default: this rank's share of the cores; ``0`` decodes in this process).
    ``normalize=False`` yields ``Batch.images`` as uint8 ``[N,3,H,W]`` (a channels_last view):
    the models normalize uint8 input themselves (``affpipe.models``), which keeps a 4x larger
    float copy out of the loader — the trainers use it.
    """
    from affpipe._optional import dali_available
    from affpipe.augment import AugmentConfig

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
        log.info("loader backend: %s (%s)", backend, "DALI importable" if backend == "dali" else "DALI not importable")
    aug = AugmentConfig(image_size=image_size, train=train, flip_p=flip_p, max_rotation=max_rotation)
    rank, world = dist_env(rank, world_size)
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    workers = default_workers() if num_workers is None else int(num_workers)  # 0: in-process
    kwargs = dict(
        shards=Path(shards), split=split, batch_size=batch_size, aug=aug, device=torch.device(device),
        seed=seed, rank=rank, world=world, num_workers=workers, on_bad=on_bad, normalize=normalize,
    )
    if backend == "dali":
        from affpipe._optional import import_dali

        import_dali()  # a clear ImportError when it is missing
        from affpipe.loaders.dali import DaliLoader

        return DaliLoader(**kwargs)
    from affpipe.loaders.torch_loader import TorchLoader

    return TorchLoader(**kwargs)


class BaseLoader:
    """Shard validation, the epoch plan and the bookkeeping both backends share."""

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

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s shuffle (shard order, sample order, augmentation draws)."""
        self.epoch = int(epoch)

    def shard_order(self, epoch: int) -> list[int]:
        """Shard order of an epoch: seeded permutation (train) or manifest order (val)."""
        return shard_order(len(self.shards), self.seed, epoch, self.train)

    def epoch_seed(self, epoch: int) -> int:
        """A per-(seed, epoch, rank) seed for shuffling and augmentation draws."""
        return epoch_seed(self.seed, epoch, self.rank)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, shards={len(self.shards)}, samples={self.total}, "
                f"rank={self.rank}/{self.world}, batches={self.num_batches}, train={self.train})")
