"""The DALI loader: the epoch plan's JPEG bytes → image decoder → one NN warp → ``Batch``.

DALI is fed by ``fn.external_source`` with the samples of the shared epoch plan
(``affpipe.loaders.plan``), read as zero-copy views of the memory-mapped tars
(``affpipe.loaders.source``): both backends yield the same samples in the same order with the
same augmentation draws, and an epoch can start at any batch without reading the ones before
(``set_epoch(e, start_batch=k)``, the trainers' mid-epoch resume).

GPU (``device`` is CUDA): ``fn.decoders.image(device="mixed")`` (nvJPEG) and the flip+rotation
``warp_affine`` run on the GPU, with the per-sample matrices fed beside the bytes. CPU
(``device_id=None``): DALI's thread pool decodes; the warp runs in OpenCV on the calling thread,
overlapping with DALI decoding the next batch.

Where each step runs, and why (DALI 2.4 CPU operators, 2 cores, 112 px, batch 128, measured on
the synthetic twin): read + decode 18.3k frames/s; adding DALI's ``flip`` 13.3k, its
nearest-neighbour ``rotate`` 10.6k — ~80 µs of a core per frame for a 112 px warp, where
``cv2.warpAffine`` takes ~22 µs. So the flip is folded into the rotation matrix
(``affpipe.loaders.augment``: ``dst = R·F·src``) and one nearest-neighbour warp does both —
torchvision's ``RandomRotation`` default interpolation, which the research used. Batches stay
uint8 HWC until the end (4x fewer bytes than float); the HWC→CHW view and the normalization
happen in torch on the training device (``normalize_uint8``). On a CPU-only host the torch
backend's thread pool needs less CPU per frame than DALI's CPU decoder (see
``affpipe.loaders.threads``); DALI earns its place on the GPU.

Val batches follow the plan in order; the last one is partial (DALI takes a smaller batch from
an external source), so every sample appears exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from affpipe.batch import Batch, host_to_device
from affpipe.labels import record_problems
from affpipe.loaders.augment import NATIVE_SIZE, affine_matrices, sample_params, warp_batch
from affpipe.loaders.base import BaseLoader
from affpipe.loaders.checks import DALI_SKIP_HINT, SKIP_HINT, decode_jpeg
from affpipe.loaders.source import ShardTable
from affpipe.shards.format import sample_key

log = logging.getLogger(__name__)


def _graph(*, aug, gpu: bool, jpegs, matrices, native: int = NATIVE_SIZE):
    """External source → decoder (→ resize) (→ flip+rotation warp: on the GPU only); also each
    stored frame's shape, read from its header, so an off-size frame is caught before any resize."""
    from nvidia.dali import fn, types

    jpg = fn.external_source(source=jpegs, batch=True, batch_info=True, dtype=types.UINT8, ndim=1)
    img = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
    shape = fn.peek_image_shape(jpg)
    size = aug.image_size
    if size != native:  # from the split's stored frame size, as the torch backend resizes
        img = fn.resize(img, size=(size, size), interp_type=types.INTERP_LINEAR, antialias=True)
    if aug.augments and gpu:
        mtx = fn.external_source(source=matrices, batch=True, batch_info=True, dtype=types.FLOAT, ndim=2)
        img = fn.warp_affine(img, matrix=mtx, size=(size, size), interp_type=types.INTERP_NN,
                             fill_value=0, inverse_map=False)
    return img, shape


class DaliLoader(BaseLoader):
    """``Loader`` on a DALI pipeline (GPU when ``device`` is CUDA, else CPU-only)."""

    backend = "dali"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.table = ShardTable(self.shards)
        self._pipe = None  # built on first use, then kept (``_pipeline``)
        self._feed: tuple[np.ndarray, int, int] | None = None  # (samples, seed, start batch) of the pass
        self._started = False  # a pass ran on the pipeline since its last reset

    def _selection(self, samples: np.ndarray, seed: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batch ``b``'s ``(shard, sample)`` rows and its augmentation draws (as the torch backend)."""
        sel = samples[b * self.batch_size:(b + 1) * self.batch_size]
        flips, angles = sample_params(np.random.default_rng([seed, b]), len(sel), self.aug)
        return sel, flips, angles

    def _pipeline(self):
        """The loader's one DALI pipeline (built on first use, kept for the loader's lifetime: a
        GPU pipeline's setup — nvJPEG, buffers — is paid once, not per epoch or validation pass).
        Its inputs read the epoch in progress from ``self._feed``."""
        from nvidia.dali import pipeline_def

        if self._pipe is not None:
            return self._pipe
        gpu = self.device.type == "cuda"

        def batch_of(info) -> int:  # DALI asks for iterations 0, 1, … of its epoch: batches start, start+1, …
            if self._feed is None:
                raise StopIteration  # draining: no more batches of the abandoned pass
            b = self._feed[2] + info.iteration
            if b >= self.num_batches:
                raise StopIteration
            return b

        def jpegs(info):
            b = batch_of(info)
            samples = self._feed[0]
            sel = samples[b * self.batch_size:(b + 1) * self.batch_size]
            views = self.table.jpegs(sel)
            if views is None:
                raise ValueError(self._bad_member(sel))
            return views

        def matrices(info):
            b = batch_of(info)
            _, flips, angles = self._selection(self._feed[0], self._feed[1], b)
            return list(affine_matrices(angles, flips, self.aug.image_size, corner=True).astype(np.float32))

        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        pipe = pipeline_def(_graph, batch_size=self.batch_size, num_threads=max(1, self.num_workers),
                            device_id=device_id, seed=self.seed, prefetch_queue_depth=2)(
            aug=self.aug, gpu=gpu, jpegs=jpegs, matrices=matrices,
            native=(self.frame_size or (NATIVE_SIZE, NATIVE_SIZE))[0])
        pipe.build()
        self._pipe = pipe
        return pipe

    def _end_pass(self) -> None:
        """Finish the pass in progress (completed or abandoned): the inputs stop, the few batches
        DALI prefetched are dropped, and the pipeline starts its next epoch at iteration 0."""
        if self._pipe is None or not self._started:
            return
        self._feed = None
        try:
            while True:
                self._pipe.run()
        except StopIteration:
            pass
        self._pipe.reset()
        self._started = False

    def close(self) -> None:
        """Release the DALI pipeline now (it is otherwise kept for the next pass)."""
        self._feed, self._pipe, self._started = None, None, False

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self.epoch, self.take_start_batch()
        samples, seed = self.plan.samples(epoch)
        if start >= self.num_batches:
            return
        try:
            self._end_pass()
        except (RuntimeError, ValueError):  # the last pass failed inside DALI: start afresh
            self.close()
        pipe = self._pipeline()
        self._feed, self._started = (samples, seed, start), True
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for b in range(start, self.num_batches):
            sel, flips, angles = self._selection(samples, seed, b)
            try:
                # On CUDA the outputs are bound to torch's stream: the host does not wait for DALI's GPU work
                images, shapes = pipe.run(stream) if stream is not None else pipe.run()
            except (RuntimeError, ValueError) as exc:
                self.close()
                raise self._diagnose(samples, b, exc) from exc
            records = self.table.records(sel)
            if records is None:
                raise ValueError(self._bad_member(sel))
            keep = self._good(sel, records, np.array(shapes.as_tensor())[:, :2], images)
            if not len(keep):
                continue
            flips, angles = flips[keep], angles[keep]
            self.last_augment = {"flip": torch.from_numpy(flips), "angle": torch.from_numpy(angles)}
            yield self._batch(images, torch.from_numpy(records[keep]), flips, angles, keep)

    def _batch(self, images, raw: torch.Tensor, flips: np.ndarray, angles: np.ndarray, keep: np.ndarray) -> Batch:
        raw = host_to_device(raw, self.device)  # through pinned memory: no staging wait on the host
        whole = len(keep) == len(images)
        if self.device.type == "cuda":
            if not whole:  # rare: a bad sample dropped; the rest goes through the host
                cpu = images.as_cpu()
                return self.finish(host_to_device(torch.from_numpy(np.stack([np.asarray(cpu.at(int(i))) for i in keep])),
                                                  self.device), raw)
            # DALI's output as a torch tensor without a copy (DLPack, ordered on the current
            # stream of the loader's device). With DALI's default (dynamic) executor an output
            # buffer is never reused while it is referenced, as DALI's own PyTorch iterator relies on.
            with torch.cuda.device(self.device):
                return self.finish(torch.from_dlpack(images.as_tensor()), raw)
        if whole:
            img = np.asarray(images.as_tensor())  # a view of DALI's buffer
        else:
            img = np.stack([np.asarray(images.at(int(i))) for i in keep])  # new memory
        if self.aug.augments:
            img = warp_batch(img, flips, angles)  # new memory, no longer DALI's buffer
        return self.finish(torch.from_numpy(img), raw, reused=whole and not self.aug.augments)

    def _good(self, sel: np.ndarray, records: np.ndarray, shapes: np.ndarray, images) -> np.ndarray:
        """Positions of the batch's samples that may enter it (:mod:`affpipe.loaders.checks`): the
        stored frame has the split's size, it decoded to ``image_size``, its label record is in
        range. A bad one raises naming shard and key, or is dropped and counted (``on_bad="skip"``)."""
        n, size, want = len(sel), self.aug.image_size, self.frame_size
        decoded = np.asarray(images.shape(), np.int64).reshape(n, -1)[:, :2]
        off_size = (shapes != np.asarray(want)).any(1) if want is not None else np.zeros(n, bool)
        wrong_decode = (decoded != size).any(1)
        problems = dict(record_problems(records))
        if not problems and not off_size.any() and not wrong_decode.any():  # the common case: no Python per sample
            return np.arange(n)
        for i in np.flatnonzero(off_size | wrong_decode).tolist():
            if off_size[i]:
                problems.setdefault(i, f"frame is {shapes[i][1]}x{shapes[i][0]}, the split's frames are {want[1]}x{want[0]}")
            else:
                problems.setdefault(i, f"decoded to {decoded[i][1]}x{decoded[i][0]}, not {size}x{size}")
        for i, why in sorted(problems.items()):
            shard_i, j = (int(v) for v in sel[i])
            msg = f"{self.shards[shard_i].tar}: sample {self.sample_name(shard_i, j)}: {why}"
            if self.on_bad != "skip":
                raise ValueError(f"{msg} ({SKIP_HINT})")
            log.warning("%s; skipped", msg)
        self._count({"bad_sample": len(problems)})
        return np.array([i for i in range(n) if i not in problems], np.int64)

    def _bad_member(self, sel: np.ndarray) -> str:
        """The first sample of ``sel`` whose ``.jpg`` or ``.lbl`` is missing or malformed, named."""
        from affpipe.labels import RECORD_SIZE

        for shard_i, j in sel.tolist():
            comp = self.shard_index(shard_i)[j]
            if "jpg" not in comp or "lbl" not in comp or comp["lbl"][1] != RECORD_SIZE:
                return (f"{self.shards[shard_i].tar}: sample {sample_key(comp)}: missing or malformed member(s) "
                        f"{sorted(comp)}; {DALI_SKIP_HINT}")
        return f"{self.split}: a sample with a missing or malformed member"

    def _diagnose(self, samples: np.ndarray, b: int, exc: Exception) -> Exception:
        """DALI reports a failed batch, not the sample: find the bad one among the batches it may
        have been preparing (prefetching runs up to two ahead)."""
        import cv2

        if isinstance(exc, ValueError) and DALI_SKIP_HINT in str(exc):
            return ValueError(str(exc))
        sel = samples[b * self.batch_size:(b + 3) * self.batch_size]
        for (shard_i, j), where in zip(sel.tolist(), self.table.jpeg_where(sel), strict=True):
            _, off, size = where
            if off >= 0 and decode_jpeg(self.table.views[shard_i], size, off, cv2.IMREAD_COLOR) is None:
                key = self.sample_name(shard_i, j)
                return ValueError(
                    f"{self.shards[shard_i].tar}: sample {key}: undecodable JPEG ({size} bytes); {DALI_SKIP_HINT}"
                )
        return RuntimeError(f"DALI pipeline failed on split {self.split!r} (epoch {self.epoch}): {exc}")
