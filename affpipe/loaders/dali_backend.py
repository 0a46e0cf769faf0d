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
from collections.abc import Iterator

import numpy as np
import torch

from affpipe.batch import Batch
from affpipe.loaders.augment import NATIVE_SIZE, sample_params, warp_batch
from affpipe.loaders.base import BaseLoader
from affpipe.loaders.plan import epoch_samples
from affpipe.shards.format import parse_idx, sample_key

log = logging.getLogger(__name__)

SHUFFLE_FILL = 8192  # samples in DALI's shuffle buffer (encoded: ~5 kB each)


def _graph(paths, index_paths, *, aug, gpu: bool, rank: int, world: int, reader_seed: int, fill: int):
    """Reader → decoder (→ resize) (→ flip+rotation warp: on the GPU only, see the module doc)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    jpg, lbl = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["jpg", "lbl"], missing_component_behavior="error",
        shard_id=rank, num_shards=world, random_shuffle=aug.train, initial_fill=fill, seed=reader_seed,
        pad_last_batch=not aug.train, prefetch_queue_depth=2, name="reader",
    )
    img = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
    size = aug.image_size
    if size != NATIVE_SIZE:
        img = fn.resize(img, size=(size, size), interp_type=types.INTERP_LINEAR, antialias=True)
    if not (aug.augments and gpu):
        return img, lbl
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
    return img, lbl, flip, angle


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
                    raise self._diagnose(order, exc) from exc
                n = min(self.batch_size, left)  # val: cut off pad_last_batch's repeats
                left -= n
                yield self._batch(outs, n, b)
        finally:
            del pipe

    def _batch(self, outs, n: int, b: int) -> Batch:
        images, labels = outs[0], outs[1]
        raw = torch.from_numpy(np.array(labels.as_tensor(), copy=True)[:n]).to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = images.as_tensor()
            out = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
            img = out[:n]
            if len(outs) > 2:
                self.last_augment = {
                    "flip": torch.from_numpy(np.array(outs[2].as_tensor()).reshape(-1)[:n] != 0),
                    "angle": torch.from_numpy(np.array(outs[3].as_tensor(), np.float32).reshape(-1)[:n]),
                }
            else:
                self.last_augment = {"flip": torch.zeros(n, dtype=torch.bool), "angle": torch.zeros(n)}
            return self.finish(img, raw)
        try:
            img = np.asarray(images.as_tensor())[:n]  # a view of DALI's buffer
        except RuntimeError as exc:
            raise ValueError(f"{self.split}: images of different sizes in one batch; every source "
                             f"must be {NATIVE_SIZE}x{NATIVE_SIZE} or pass image_size") from exc
        flips, angles = sample_params(np.random.default_rng([self._aug_seed, b]), n, self.aug)
        if self.aug.augments:
            img = warp_batch(img, flips, angles)  # new memory, no longer DALI's buffer
        self.last_augment = {"flip": torch.from_numpy(flips), "angle": torch.from_numpy(angles)}
        return self.finish(torch.from_numpy(img), raw, reused=not self.aug.augments)

    def _diagnose(self, order: list[int], exc: Exception) -> Exception:
        """DALI reports a failed batch, not the sample: find the bad one(s) of this rank's shards."""
        import cv2

        rows = epoch_samples([s.samples for s in self.shards], order, self.rank, self.world)
        for shard_i in dict.fromkeys(rows[:, 0].tolist()):
            shard = self.shards[shard_i]
            data = shard.tar.read_bytes()
            for j, comp in enumerate(parse_idx(shard.idx)):
                if j not in set(rows[rows[:, 0] == shard_i, 1].tolist()) or "jpg" not in comp:
                    continue
                off, size, _ = comp["jpg"]
                if cv2.imdecode(np.frombuffer(data, np.uint8, size, off), cv2.IMREAD_COLOR) is None:
                    return ValueError(
                        f"{shard.tar}: sample {sample_key(comp)}: undecodable JPEG ({size} bytes); the DALI "
                        f"backend cannot skip it — use backend='torch', on_bad='skip', or reshard"
                    )
        return RuntimeError(f"DALI pipeline failed on split {self.split!r} (epoch {self.epoch}): {exc}")
