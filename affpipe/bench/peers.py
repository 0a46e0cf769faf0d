"""The loaders a user would pick instead of affpipe, each in its idiomatic form, for ``affpipe bench``.

Every peer is fed the same train frames, applies the same augmentation (horizontal flip p=0.5 and
a uniform ±10° nearest-neighbour rotation, black fill), uses the same batch size and one worker
per usable core (processes or threads, as the library runs them), and yields uint8 ``[N,3,H,W]``
images with the 32-byte label records turned into a ``Batch`` — the form of affpipe's uint8
loaders:

- ``wds``: plain WebDataset over affpipe's own shards, as its README writes it:
  ``wds.WebDataset(urls).shuffle(n).decode("pil").to_tuple(...).map_tuple(transform, ...)`` with
  torchvision transforms and a ``torch.utils.data.DataLoader``.
- ``litdata``: ``litdata.optimize`` of the same JPEG files (their bytes are stored as they are)
  into LitData chunks, then ``StreamingDataset`` + ``StreamingDataLoader``; the conversion is timed
  apart. LitData decodes with ``torchvision.io.decode_jpeg``.
- ``ffcv``: ``DatasetWriter`` with an ``RGBImageField`` (FFCV re-encodes every frame as JPEG, at
  its default quality 90: it cannot keep the original bytes) and FFCV's ``Loader`` with
  ``SimpleRGBImageDecoder`` → ``RandomHorizontalFlip`` → a numba nearest-neighbour rotation
  (FFCV has no rotation; its documentation shows custom numba operations like this one).

The peers are optional (``pip install -e '.[bench]'``); a missing one raises ``PeerMissing``,
which the benchmark shows as a row saying so.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import mmap
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SHUFFLE = 5000  # WebDataset's sample shuffle buffer (its README's order of magnitude)


class PeerMissing(RuntimeError):
    """The peer library is not installed."""


def require(module: str, pip_name: str) -> None:
    """Raise ``PeerMissing`` (with the install command) when ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise PeerMissing(f"not installed (pip install {pip_name}, or pip install -e '.[bench]')")


@dataclass(frozen=True)
class PeerData:
    """Where a peer finds the benchmark frames: affpipe's shards, the frame tree's files via the
    index, and a scratch folder for converted copies."""

    shards: Path
    index: Path
    work: Path


def train_samples(shards: Path, split: str = "train") -> Iterator[tuple[int, bytes, bytes]]:
    """``(row_id, jpeg bytes, 32-byte record)`` of every sample of a split, in shard order."""
    from affpipe.shards import shard_paths
    from affpipe.shards.format import parse_idx, sample_key

    for tar, idx in shard_paths(Path(shards), split):
        with open(tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for comp in parse_idx(Path(idx)):
                (jo, jn, _), (lo, ln, _) = comp["jpg"], comp["lbl"]
                yield int(sample_key(comp)), mm[jo:jo + jn], mm[lo:lo + ln]


def _to_batch(images: torch.Tensor, records: torch.Tensor):
    from affpipe.batch import make_batch

    return make_batch(images, records.to(torch.uint8).reshape(len(records), -1))


def _tv_transform():
    """The research's augmentation with torchvision v2: flip + RandomRotation(10) (nearest)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomHorizontalFlip(0.5), v2.RandomRotation(10.0), v2.PILToTensor()])


# ---- WebDataset ------------------------------------------------------------------------------


class _Batches:
    """Wraps a DataLoader of ``(images uint8 NCHW, records)`` into ``Batch``es."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __iter__(self):
        for images, records in self.loader:
            yield _to_batch(images, records)


def _record(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def build_wds(data: PeerData, *, batch_size: int, workers: int, seed: int):
    """Plain WebDataset + DataLoader over affpipe's train shards (what a WebDataset user writes)."""
    require("webdataset", "webdataset")
    import webdataset as wds
    from torch.utils.data import DataLoader

    from affpipe.shards import shard_paths

    urls = [str(t) for t, _ in shard_paths(data.shards, "train")]
    if len(urls) < workers:
        log.warning("webdataset: %d shard(s) for %d workers; some workers get none", len(urls), workers)
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, empty_check=False)
          .shuffle(SHUFFLE).decode("pil").to_tuple("jpg", "lbl").map_tuple(_tv_transform(), _record))
    return _Batches(DataLoader(ds, batch_size=batch_size, num_workers=workers, drop_last=True))


# ---- LitData ---------------------------------------------------------------------------------


def _litdata_sample(item: tuple[str, bytes]) -> dict:
    from PIL import Image

    path, record = item
    # A JpegImageFile opened from its file: LitData stores the file's bytes unchanged.
    return {"image": Image.open(path), "lbl": np.frombuffer(record, np.uint8).copy()}


def litdata_inputs(data: PeerData) -> list[tuple[str, bytes]]:
    """``(JPEG file of the frame tree, record)`` for every train sample of the shards."""
    from affpipe.index import image_path, load_index

    table, meta = load_index(data.index)
    cols = table.select(["row_id", "image_root", "image"]).to_pydict()
    where = {r: (root, img) for r, root, img in zip(cols["row_id"], cols["image_root"], cols["image"], strict=True)}
    return [(str(image_path(meta, *where[row])), rec) for row, _, rec in train_samples(data.shards)]


def prepare_litdata(data: PeerData, *, workers: int) -> dict:
    """``litdata.optimize`` the train frames into ``work/litdata`` (reused when complete)."""
    require("litdata", "litdata")
    import litdata as ld

    out = data.work / "litdata"
    stamp = out / "affpipe-done.json"
    if stamp.is_file():
        return {**json.loads(stamp.read_text()), "reused": True}
    shutil.rmtree(out, ignore_errors=True)
    inputs = litdata_inputs(data)
    t0 = time.perf_counter()
    ld.optimize(fn=_litdata_sample, inputs=inputs, output_dir=str(out), chunk_bytes="64MB",
                num_workers=workers, mode="overwrite", start_method="fork")
    if not json.loads((out / "index.json").read_text()).get("chunks"):
        raise RuntimeError(f"litdata.optimize wrote no chunks into {out}")
    info = {"samples": len(inputs), "convert_s": round(time.perf_counter() - t0, 2),
            "bytes": sum(p.stat().st_size for p in out.glob("*") if p.is_file())}
    stamp.write_text(json.dumps(info) + "\n")
    return {**info, "reused": False}


def build_litdata(data: PeerData, *, batch_size: int, workers: int, seed: int):
    """LitData ``StreamingDataset`` (torchvision decode, v2 flip + rotation) + ``StreamingDataLoader``."""
    require("litdata", "litdata")
    import litdata as ld
    from torchvision.transforms import v2

    prepare_litdata(data, workers=workers)
    aug = v2.Compose([v2.RandomHorizontalFlip(0.5), v2.RandomRotation(10.0)])

    class Frames(ld.StreamingDataset):
        def __getitem__(self, index):
            item = super().__getitem__(index)
            return aug(item["image"]), torch.from_numpy(item["lbl"])

    ds = Frames(str(data.work / "litdata"), shuffle=True, seed=seed, drop_last=True)
    return _Batches(ld.StreamingDataLoader(ds, batch_size=batch_size, num_workers=workers, drop_last=True))


# ---- FFCV ------------------------------------------------------------------------------------


class _DecodedFrames:
    """Indexed dataset for FFCV's writer: ``(RGB uint8 HWC, record)`` per train sample."""

    def __init__(self, shards: Path) -> None:
        self.samples = [(jpg, rec) for _, jpg, rec in train_samples(shards)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        import cv2

        jpg, rec = self.samples[i]
        return cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR_RGB), np.frombuffer(rec, np.uint8).copy()


def prepare_ffcv(data: PeerData, *, workers: int) -> dict:
    """FFCV ``DatasetWriter`` of the train frames into ``work/ffcv/train.beton`` (reused)."""
    require("ffcv", "ffcv")
    from ffcv.fields import NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    from affpipe.labels import RECORD_SIZE

    out = data.work / "ffcv"
    stamp = out / "affpipe-done.json"
    if stamp.is_file():
        return {**json.loads(stamp.read_text()), "reused": True}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    frames = _DecodedFrames(data.shards)
    t0 = time.perf_counter()
    writer = DatasetWriter(str(out / "train.beton"), {
        "image": RGBImageField(write_mode="jpg"),
        "lbl": NDArrayField(np.dtype("uint8"), (RECORD_SIZE,)),
    }, num_workers=workers)
    writer.from_indexed_dataset(frames)
    info = {"samples": len(frames), "convert_s": round(time.perf_counter() - t0, 2),
            "bytes": (out / "train.beton").stat().st_size}
    stamp.write_text(json.dumps(info) + "\n")
    return {**info, "reused": False}


def _ffcv_rotation(max_degrees: float):
    """A nearest-neighbour random rotation as an FFCV numba ``Operation`` (FFCV has none)."""
    from dataclasses import replace

    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class RandomRotationNN(Operation):
        def generate_code(self):
            my_range = Compiler.get_iterator()
            rad = max_degrees * math.pi / 180.0

            def rotate(images, dst):
                n, h, w, c = images.shape
                angles = (np.random.rand(n) * 2.0 - 1.0) * rad
                cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
                for i in my_range(n):
                    ca, sa = np.cos(angles[i]), np.sin(angles[i])
                    for y in range(h):
                        for x in range(w):
                            dx, dy = x - cx, y - cy
                            sx = int(np.floor(ca * dx - sa * dy + cx + 0.5))
                            sy = int(np.floor(sa * dx + ca * dy + cy + 0.5))
                            inside = 0 <= sx < w and 0 <= sy < h
                            for k in range(c):
                                dst[i, y, x, k] = images[i, sy, sx, k] if inside else 0
                return dst

            rotate.is_parallel = True
            return rotate

        def declare_state_and_memory(self, previous_state):
            return (replace(previous_state, jit_mode=True),
                    AllocationQuery(previous_state.shape, previous_state.dtype))

    return RandomRotationNN()


def build_ffcv(data: PeerData, *, batch_size: int, workers: int, seed: int):
    """FFCV ``Loader``: JPEG decode → flip → NN rotation → uint8 NCHW tensors."""
    require("ffcv", "ffcv")
    from ffcv.fields.decoders import NDArrayDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    prepare_ffcv(data, workers=workers)
    pipelines = {
        "image": [SimpleRGBImageDecoder(), RandomHorizontalFlip(0.5), _ffcv_rotation(10.0), ToTensor(), ToTorchImage()],
        "lbl": [NDArrayDecoder(), ToTensor()],
    }
    loader = Loader(str(data.work / "ffcv" / "train.beton"), batch_size=batch_size, num_workers=workers,
                    order=OrderOption.RANDOM, drop_last=True, pipelines=pipelines, seed=seed)
    return _Batches(loader)


def prepare_isolated(name: str, data: PeerData, *, workers: int) -> dict:
    """Run a peer's conversion in a child process: LitData's ``optimize`` starts its own worker
    pool and FFCV's writer its own, and neither should leave state (a multiprocessing start
    method, numba threads) in the benchmark's process. Returns the conversion's summary."""
    import subprocess
    import sys

    require(name, name)  # the module names are the peers' names
    code = ("import json, sys; from pathlib import Path; from affpipe.bench import peers; "
            "d = peers.PeerData(*map(Path, sys.argv[2:5])); "
            "print(json.dumps(peers.PEERS[sys.argv[1]][1](d, workers=int(sys.argv[5]))))")
    proc = subprocess.run([sys.executable, "-c", code, name, str(data.shards), str(data.index), str(data.work), str(workers)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{name} conversion failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# name -> (build the loader, convert the frames to its own format or None); the benchmark's
# row labels live with its other cases (affpipe.bench.cases.LOADER_CASES)
PEERS = {
    "wds": (build_wds, None),
    "litdata": (build_litdata, prepare_litdata),
    "ffcv": (build_ffcv, prepare_ffcv),
}
