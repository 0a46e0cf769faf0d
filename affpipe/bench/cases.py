"""The cases ``affpipe bench`` times: loaders, the raw decode ceiling, the training step.

Every loader case builds an iterable of ``Batch`` whose images are augmented (flip + ±10°
rotation), normalized and on the training device — what a training step consumes — so the
frames/s figures are comparable. Shared with ``affpipe.bench.gpu``; GPU-only pieces take the
device as an argument so their logic also runs (slowly) on a CPU in the tests.
"""

from __future__ import annotations

import logging
import math
import tarfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from affpipe.batch import Batch, make_batch, normalize_uint8
from affpipe.bench.common import Endless
from affpipe.dist import usable_cores
from affpipe.labels import RECORD_SIZE, records_from_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderCase:
    """One row of the loader table: how to build it, and whether it needs CUDA."""

    name: str
    label: str
    needs_cuda: bool = False
    needs_dali: bool = False
    peer: bool = False  # another library's loader (affpipe.bench.peers), an optional extra
    train_step: bool = True  # also time a training step fed by it (the loaders trainers use)


# "float": batches normalized in the loader (the research's contract); "uint8": the trainers'
# setting (normalize=False), where the model's first op normalizes — the same arithmetic, on the
# training device, without a 4x larger float copy in the loader.
LOADER_CASES: tuple[LoaderCase, ...] = (
    LoaderCase("research", "research: per-frame JPEG, PIL, torchvision, DataLoader"),
    LoaderCase("wds", "WebDataset: WebDataset(urls).shuffle().decode('pil') + torchvision v2, DataLoader, uint8",
               train_step=False, peer=True),
    LoaderCase("litdata", "LitData: optimize + StreamingDataset/StreamingDataLoader + torchvision v2, uint8",
               train_step=False, peer=True),
    LoaderCase("ffcv", "FFCV: DatasetWriter + Loader (numba JPEG decode, flip, NN rotation op), uint8",
               train_step=False, peer=True),
    LoaderCase("torch", "affpipe torch backend (decode threads), float", train_step=False),
    LoaderCase("torch-u8", "affpipe torch backend (decode threads), uint8 (model normalizes) — the CPU trainers' loader"),
    LoaderCase("torch-proc-u8", "affpipe torch backend, DataLoader worker processes, uint8", train_step=False),
    LoaderCase("dali-cpu", "affpipe DALI, CPU mode, float", needs_dali=True, train_step=False),
    LoaderCase("dali-cpu-u8", "affpipe DALI, CPU mode, uint8 (model normalizes)", needs_dali=True, train_step=False),
    LoaderCase("dali-gpu", "affpipe DALI, GPU decoding (mixed), uint8 — the GPU trainers' loader", needs_cuda=True, needs_dali=True),
    LoaderCase("tv-gpu-decode", "torchvision decode_jpeg on the GPU", needs_cuda=True),
)


# ---- reading shard bytes directly (decode ceiling, torchvision GPU decode) ------------------


def iter_shard_samples(tars: Iterable[Path]) -> Iterator[tuple[bytes, bytes]]:
    """``(jpeg bytes, 32-byte record)`` pairs of the shards, in file order."""
    for tar in tars:
        pending: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar, "r|") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                data = tf.extractfile(member).read()
                sample = pending.setdefault(key, {})
                sample[ext] = data
                if "jpg" in sample and "lbl" in sample:
                    del pending[key]
                    yield sample["jpg"], sample["lbl"]


def train_tars(shards: Path, split: str = "train") -> list[Path]:
    from affpipe.shards import shard_paths

    return [tar for tar, _ in shard_paths(Path(shards), split)]


def read_jpegs(shards: Path, limit: int, split: str = "train") -> list[bytes]:
    """The first ``limit`` JPEGs of a split's shards, in memory."""
    out: list[bytes] = []
    for jpg, _ in iter_shard_samples(train_tars(shards, split)):
        out.append(jpg)
        if len(out) >= limit:
            break
    return out


def decode_ceiling_step(jpegs: list[bytes], chunk: int = 256) -> Callable[[], tuple[int, float]]:
    """A step decoding the next ``chunk`` JPEGs with cv2 (libjpeg-turbo) on the calling thread."""
    import cv2

    cv2.setNumThreads(1)  # imdecode is single-threaded; this keeps cv2's pool out of the figure
    bufs = [np.frombuffer(b, np.uint8) for b in jpegs]
    pos = 0

    def step() -> tuple[int, float]:
        nonlocal pos
        for _ in range(chunk):
            img = cv2.imdecode(bufs[pos], cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"cv2 could not decode JPEG #{pos} of the benchmark shards")
            pos = (pos + 1) % len(bufs)
        return chunk, 0.0

    return step


# ---- torchvision decode_jpeg on the GPU ------------------------------------------------------


def flip_rotate(images: torch.Tensor, *, max_degrees: float, flip_p: float, generator: torch.Generator) -> torch.Tensor:
    """Per-sample horizontal flip and rotation in ±``max_degrees`` as one nearest-neighbour warp.

    Float ``[N,C,H,W]`` in, same out, filled with 0 outside (torchvision's RandomRotation
    default). Folding the flip into the rotation's affine makes it free.
    """
    import torch.nn.functional as F

    n = images.shape[0]
    u = torch.rand(n, 2, generator=generator)
    angle = (u[:, 0] * 2 - 1) * math.radians(max_degrees)
    sign = torch.where(u[:, 1] < flip_p, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos * sign, -sin, zero], 1), torch.stack([sin * sign, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class TorchvisionDecodeLoader:
    """Shards → ``torchvision.io.decode_jpeg(device=...)`` → flip/rotate → normalize → Batch.

    A reference point, not a product loader: tar reading happens on the calling thread, so it
    shows what batched nvJPEG decoding through torchvision alone achieves.
    """

    def __init__(self, shards: Path, split: str, *, batch_size: int, device: str | torch.device, image_size: int = 112, seed: int = 0):
        self.tars = train_tars(shards, split)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.image_size = image_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        from torchvision.io import decode_jpeg

        order = torch.randperm(len(self.tars), generator=torch.Generator().manual_seed(self.epoch)).tolist()
        jpgs: list[torch.Tensor] = []
        lbls: list[bytes] = []
        for jpg, lbl in iter_shard_samples([self.tars[i] for i in order]):
            jpgs.append(torch.frombuffer(bytearray(jpg), dtype=torch.uint8))
            lbls.append(lbl)
            if len(jpgs) == self.batch_size:
                with warnings.catch_warnings():
                    # torchvision >= 0.29 deprecates its codecs in favour of torchcodec; the
                    # brief measures decode_jpeg itself, so keep the reference as it is.
                    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
                    decoded = decode_jpeg(jpgs, device=self.device)
                yield self._batch(decoded, lbls)
                jpgs, lbls = [], []

    def _batch(self, decoded: list[torch.Tensor], lbls: list[bytes]) -> Batch:
        import torch.nn.functional as F

        x = torch.stack(decoded).float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        x = flip_rotate(x, max_degrees=10.0, flip_p=0.5, generator=self.generator)
        raw = torch.frombuffer(bytearray(b"".join(lbls)), dtype=torch.uint8).view(-1, RECORD_SIZE)
        return make_batch(normalize_uint8(x), raw.to(self.device, non_blocking=True))


# ---- building loaders ------------------------------------------------------------------------


def fork_safe_cv2() -> None:
    """Stop OpenCV's thread pool before DataLoader workers are forked.

    A process that already ran threaded cv2 code (the synthetic data generator does) forks
    children holding a copy of the pool's locks without its threads; the first cv2 call that
    touches the pool in a child (``cv2.setNumThreads`` in the torch loader's worker init,
    ``warpAffine``) then blocks forever. One thread in the parent joins the pool first.
    """
    try:
        import cv2
    except ImportError:
        return
    cv2.setNumThreads(1)


def build_loader(name: str, *, index: Path, shards: Path, batch_size: int, device: str | torch.device, image_size: int = 112,
                 seed: int = 0, work: Path | None = None) -> Iterable[Batch]:
    """The loader of case ``name`` over the train split, yielding augmented training batches.
    Peers keep their converted copies of the frames under ``work``."""
    cores = usable_cores()
    fork_safe_cv2()
    from affpipe.bench import peers

    if name in peers.PEERS:
        data = peers.PeerData(shards=shards, index=index, work=work or shards.parent / "peers")
        return peers.PEERS[name][0](data, batch_size=batch_size, workers=cores, seed=seed)
    if name == "research":
        from affpipe.bench.research_loader import make_research_loader

        return make_research_loader(index, "train", batch_size=batch_size, num_workers=cores, image_size=image_size, seed=seed, train=True)
    if name == "tv-gpu-decode":
        return TorchvisionDecodeLoader(shards, "train", batch_size=batch_size, device=device, image_size=image_size, seed=seed)
    from affpipe.loaders import make_loader

    backend, loader_device = {
        "torch": ("torch", device),
        "torch-u8": ("torch", device),
        "torch-proc-u8": ("torch", device),
        "dali-cpu": ("dali", "cpu"),
        "dali-cpu-u8": ("dali", "cpu"),
        "dali-gpu": ("dali", device),
    }[name]
    return make_loader(
        shards, "train", batch_size=batch_size, train=True, backend=backend, device=loader_device,
        image_size=image_size, seed=seed, num_workers=cores, normalize=not (name.endswith("-u8") or name == "dali-gpu"),
        parallel="processes" if "-proc" in name else "threads",
    )


def loader_step(loader: Iterable[Batch], device: str | torch.device) -> Callable[[], tuple[int, float]]:
    """A step that takes the next batch and makes sure it sits on ``device``."""
    it = Endless(loader)
    device = torch.device(device)

    def step() -> tuple[int, float]:
        b = next(it)
        if b.images.device.type != device.type:
            b = b.to(device)
        return len(b), 0.0

    step.source = it  # lets measure() time the epoch starts
    return step


# ---- the training step -----------------------------------------------------------------------


class TrainStep:
    """The trainer's own optimizer step (``affpipe.train.trainer.Trainer.step``: AdamW,
    grad scaler, fp32 loss) on a default multi-task ResNet-18, on one device.

    ``amp_dtype`` (bf16) and ``channels_last`` are the GPU recipe; the CPU bench runs fp32
    NCHW, which is what a CPU trains fastest in. ``compile``: ``torch.compile`` as a run with
    ``compile = true`` does (``Trainer.wrap``), so the compiled model is the one the step runs.
    """

    def __init__(self, table, *, device: str | torch.device, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                 seed: int = 0, compile: bool = False):
        from affpipe.dist import DistContext
        from affpipe.run.config import TrainConfig
        from affpipe.scoring.tasks import label_statistics
        from affpipe.train.trainer import Trainer

        self.device = torch.device(device)
        self.table = table
        amp = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
        cfg = TrainConfig(task="mtl", amp=amp, channels_last=channels_last, seed=seed, device=self.device.type,
                          compile=compile)
        self.trainer = Trainer.build(cfg, DistContext(rank=0, world=1, device=self.device), label_statistics(table))
        self.trainer.wrap()
        self.model = self.trainer.model  # what Trainer.step runs (compiled when asked)
        self.model.train()

    def __call__(self, batch: Batch) -> None:
        self.trainer.step(batch)

    def synthetic_batch(self, batch_size: int, image_size: int) -> Batch:
        """Random uint8 images (NHWC memory viewed as NCHW, as the loaders yield them to the
        trainers: the model normalizes) with real label records from the table, on the device."""
        recs = records_from_table(self.table.slice(0, min(batch_size, len(self.table))))
        raw = np.ascontiguousarray(recs).view(np.uint8).reshape(len(recs), RECORD_SIZE)
        raw = np.resize(raw, (batch_size, RECORD_SIZE))  # tiles rows when the table is smaller
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8, generator=gen)
        return make_batch(images.permute(0, 3, 1, 2), torch.from_numpy(raw.copy())).to(self.device)

    def synthetic_step(self, batch_size: int, image_size: int) -> Callable[[], tuple[int, float]]:
        batch = self.synthetic_batch(batch_size, image_size)

        def step() -> tuple[int, float]:
            self(batch)
            return len(batch), 0.0

        return step

    def fed_step(self, loader: Iterable[Batch]) -> Callable[[], tuple[int, float]]:
        """A step that waits for the loader's next batch (timed) and trains on it.

        No device sync per step: on a GPU the host runs ahead until the launch queue is full, so
        the time spent blocked in ``next()`` is time the GPU had nothing queued — the data wait.
        """
        it = Endless(loader)

        def step() -> tuple[int, float]:
            t0 = time.perf_counter()
            b = next(it)
            if b.images.device.type != self.device.type:
                b = b.to(self.device)
            wait = time.perf_counter() - t0
            self(b)
            return len(b), wait

        step.source = it
        return step


def close_loader(loader: object) -> None:
    """Stop a loader's workers now rather than at garbage collection (frees the cores)."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    if hasattr(loader, "close"):
        loader.close()


__all__ = [
    "LOADER_CASES", "LoaderCase", "TorchvisionDecodeLoader", "TrainStep", "build_loader", "close_loader",
    "decode_ceiling_step", "flip_rotate", "fork_safe_cv2", "iter_shard_samples", "loader_step", "read_jpegs",
]
