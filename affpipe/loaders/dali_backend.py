"""The DALI loader: ``fn.readers.webdataset`` → image decoder → one NN warp → ``Batch``.

GPU (``device`` is CUDA): ``fn.decoders.image(device="mixed")`` (nvJPEG) and the flip+rotation
``warp_affine`` run on the GPU. CPU (``device_id=None``): DALI's thread pool reads and decodes;
the warp runs in OpenCV on the calling thread, overlapping with DALI decoding the next batch.

Where each step runs, and why (DALI 2.4 CPU operators, 2 cores, 112 px, batch 128, measured on
the synthetic twin): read + decode 18.3k frames/s; adding DALI's ``flip`` 13.3k, its
nearest-neighbour ``rotate`` 10.6k — ~80 µs of a core per frame for a 112 px warp, where
``cv2.warpAffine`` takes ~22 µs. So the flip is folded into the rotation matrix
(``affpipe.loaders.augment``: ``dst = R·F·src``) and one nearest-neighbour ``cv2.warpAffine`` does both
— torchvision's ``RandomRotation`` default interpolation, which the research used. Batches
stay uint8 HWC until the end (4x fewer bytes than float); the HWC→CHW view and the
normalization happen in torch on the training device (``normalize_uint8``).

Epochs: a pipeline is built per epoch with the epoch's shard order and seeds, so
``set_epoch`` is exact and a resumed run reproduces the same epoch. The reader's
``shard_id``/``num_shards`` split is the one ``affpipe.loaders.base`` documents; val uses
``pad_last_batch`` and the padding is cut off, so every sample appears exactly once.
"""

from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Iterator

import numpy as np
import torch

from affpipe.batch import Batch
from affpipe.labels import record_problems
from affpipe.loaders.augment import NATIVE_SIZE, sample_params, warp_batch
from affpipe.loaders.base import BaseLoader
from affpipe.loaders.checks import decode_jpeg
from affpipe.loaders.plan import epoch_samples
from affpipe.shards.format import parse_idx, sample_key

log = logging.getLogger(__name__)

SHUFFLE_FILL = 8192  # samples in DALI's shuffle buffer (encoded: ~5 kB each)


def _graph(paths, index_paths, *, aug, gpu: bool, rank: int, world: int, reader_seed: int, fill: int,
           native: int = NATIVE_SIZE):
    """Reader → decoder (→ resize) (→ flip+rotation warp: on the GPU only, see the module doc)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    jpg, lbl = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["jpg", "lbl"], missing_component_behavior="error",
        shard_id=rank, num_shards=world, random_shuffle=aug.train, initial_fill=fill, seed=reader_seed,
        pad_last_batch=not aug.train, prefetch_queue_depth=2, name="reader",
    )
    img = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
    shape = fn.peek_image_shape(jpg)  # the stored frame's size, before any resize: checked per batch
    size = aug.image_size
    if size != native:  # the split's stored frame size (as the torch backend, which resizes the same)
        img = fn.resize(img, size=(size, size), interp_type=types.INTERP_LINEAR, antialias=True)
    if not (aug.augments and gpu):
        return img, lbl, shape
    flip = fn.random.coin_flip(probability=aug.flip_p)
    angle = fn.random.uniform(range=(-aug.max_rotation, aug.max_rotation))
    # affpipe.augment.affine_matrix(angle, flip, size, corner=True), per sample in the graph
    rad = angle * (math.pi / 180.0)
    a, b = dmath.cos(rad), dmath.sin(rad)
    s = 1.0 - 2.0 * fn.cast(flip, dtype=types.FLOAT)
    c = size / 2.0
    mtx = fn.reshape(fn.stack(a * s, b, c - a * s * c - b * c, -b * s, a, c + b * s * c - a * c), shape=(2, 3))
    img = fn.warp_affine(img, matrix=mtx, size=(size, size), interp_type=types.INTERP_NN,
                         fill_value=0, inverse_map=False)
    return img, lbl, shape, flip, angle


class DaliLoader(BaseLoader):
    """``Loader`` on a DALI pipeline (GPU when ``device`` is CUDA, else CPU-only)."""

    backend = "dali"

    def _pipeline(self, order: list[int], seed: int):
        from nvidia.dali import pipeline_def

        gpu = self.device.type == "cuda"
        shards = [self.shards[i] for i in order]
        fill = max(1, min(SHUFFLE_FILL, self.rank_samples))
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        pipe = pipeline_def(_graph, batch_size=self.batch_size, num_threads=max(1, self.num_workers),
                            device_id=device_id, seed=seed, prefetch_queue_depth=2)(
            [str(s.tar) for s in shards], [str(s.idx) for s in shards], aug=self.aug, gpu=gpu,
            native=(self.frame_size or (NATIVE_SIZE, NATIVE_SIZE))[0],
            rank=self.rank, world=self.world, reader_seed=seed, fill=fill,
        )
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        order, seed = self.shard_order(epoch), self.epoch_seed(epoch)
        pipe = self._pipeline(order, seed)
        self._aug_seed = seed
        try:
            left = self.samples_per_epoch
            for b in range(self.num_batches):
                try:
                    outs = pipe.run()
                except RuntimeError as exc:
                    raise self._diagnose(order, exc, b) from exc
                n = min(self.batch_size, left)  # val: cut off pad_last_batch's repeats
                left -= n
                batch = self._batch(outs, n, b)
                if batch is not None:
                    yield batch
        finally:
            del pipe

    def _batch(self, outs, n: int, b: int) -> Batch | None:
        images, labels = outs[0], outs[1]
        raw_np = np.array(labels.as_tensor(), copy=True)[:n]
        keep = self._good(raw_np, np.array(outs[2].as_tensor())[:n, :2], images, n)
        if not len(keep):
            return None
        raw = torch.from_numpy(raw_np[keep]).to(self.device, non_blocking=True)
        whole = len(keep) == n
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            if whole:
                t = images.as_tensor()
                out = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
                feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
                img = out[:n]
            else:  # rare: a bad sample dropped; gather the rest through the host
                cpu = images.as_cpu()
                img = torch.from_numpy(np.stack([np.asarray(cpu.at(int(i))) for i in keep])).to(self.device)
            if len(outs) > 3:
                self.last_augment = {
                    "flip": torch.from_numpy(np.array(outs[3].as_tensor()).reshape(-1)[:n][keep] != 0),
                    "angle": torch.from_numpy(np.array(outs[4].as_tensor(), np.float32).reshape(-1)[:n][keep]),
                }
            else:
                self.last_augment = {"flip": torch.zeros(len(keep), dtype=torch.bool), "angle": torch.zeros(len(keep))}
            return self.finish(img, raw)
        if whole:
            img = np.asarray(images.as_tensor())[:n]  # a view of DALI's buffer
        else:
            img = np.stack([np.asarray(images.at(int(i))) for i in keep])  # new memory
        flips, angles = sample_params(np.random.default_rng([self._aug_seed, b]), n, self.aug)
        flips, angles = flips[keep], angles[keep]
        if self.aug.augments:
            img = warp_batch(img, flips, angles)  # new memory, no longer DALI's buffer
        self.last_augment = {"flip": torch.from_numpy(flips), "angle": torch.from_numpy(angles)}
        return self.finish(torch.from_numpy(img), raw, reused=whole and not self.aug.augments)

    def _good(self, raw: np.ndarray, shapes: np.ndarray, images, n: int) -> np.ndarray:
        """Positions of the batch's samples that may enter it: stored frame of the split's size,
        decoded to ``image_size``, label record in range. A bad one raises naming shard and key,
        or is dropped and counted (``on_bad="skip"``)."""
        want = self.frame_size  # None: shards from before sizes were recorded; the decoded size still counts
        size = self.aug.image_size
        out_shapes = [tuple(sh[:2]) for sh in images.shape()[:n]]
        problems = {i: why for i, why in record_problems(raw)}
        for i in range(n):
            if want is not None and tuple(shapes[i]) != tuple(want):
                problems.setdefault(i, f"frame is {shapes[i][1]}x{shapes[i][0]}, the split's frames are {want[1]}x{want[0]}")
            elif out_shapes[i] != (size, size):
                problems.setdefault(i, f"decoded to {out_shapes[i][1]}x{out_shapes[i][0]}, not {size}x{size}")
        if not problems:
            return np.arange(n)
        for i, why in sorted(problems.items()):
            key = f"{int(raw[i].view(np.int64)[0]):010d}"
            msg = f"{self._locate(key)}: sample {key}: {why}"
            if self.on_bad != "skip":
                raise ValueError(msg + " (pass on_bad='skip' to skip bad samples)")
            log.warning("%s; skipped", msg)
        self._count({"bad_sample": len(problems)})
        return np.array([i for i in range(n) if i not in problems], np.int64)

    def _locate(self, key: str) -> str:
        """The shard holding ``key`` (a scan of this loader's indexes, only on an error)."""
        needle = f" {key}.jpg".encode()
        for shard in self.shards:
            if needle in shard.idx.read_bytes():
                return str(shard.tar)
        return f"split {self.split!r}"

    def _diagnose(self, order: list[int], exc: Exception, b: int) -> Exception:
        """DALI reports a failed batch, not the sample: find the bad one. Val reads in order, so
        the failing batch's samples (and the few DALI prefetches after it) are searched first;
        train shuffles in a buffer, so every sample of this rank's shards may be the one."""
        import cv2

        rows = epoch_samples([s.samples for s in self.shards], order, self.rank, self.world)
        tries = [suspect_rows(rows, b, self.batch_size), rows] if not self.train else [rows]
        for cand in tries:
            for shard_i, wanted in group_rows(cand).items():
                shard = self.shards[shard_i]
                index = parse_idx(shard.idx)
                with open(shard.tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    for j in wanted.tolist():
                        comp = index[j]
                        if "jpg" not in comp:
                            continue
                        off, size, _ = comp["jpg"]
                        if decode_jpeg(data, size, off, cv2.IMREAD_COLOR) is None:
                            return ValueError(
                                f"{shard.tar}: sample {sample_key(comp)}: undecodable JPEG ({size} bytes); the DALI "
                                f"backend cannot skip it — use backend='torch', on_bad='skip', or reshard"
                            )
        return RuntimeError(f"DALI pipeline failed on split {self.split!r} (epoch {self.epoch}): {exc}")


PREFETCH_BATCHES = 3  # pipeline and reader queues: DALI may fail on a batch this far ahead


def suspect_rows(rows: np.ndarray, b: int, batch_size: int) -> np.ndarray:
    """The ``[n, 2]`` (shard, sample) rows an in-order (val) pipeline read for batch ``b`` and the
    batches it may have prefetched: the only candidates for the failure it reported at ``b``."""
    return rows[b * batch_size:(b + 1 + PREFETCH_BATCHES) * batch_size]


def group_rows(rows: np.ndarray) -> dict[int, np.ndarray]:
    """``{shard: sorted sample positions}`` of ``rows`` in one pass (sorted by shard first)."""
    if not len(rows):
        return {}
    order = np.lexsort((rows[:, 1], rows[:, 0]))
    rows = rows[order]
    cuts = np.flatnonzero(np.diff(rows[:, 0])) + 1
    return {int(part[0, 0]): part[:, 1] for part in np.split(rows, cuts)}
