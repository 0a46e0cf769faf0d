"""The pre-training loader on DALI: the same plan and view draws as the CPU threads, on the GPU.

``fn.external_source`` feeds the epoch plan's JPEG bytes (zero-copy views of the tars) and, per
view, the draws of ``affpipe.loaders.views`` as per-sample arguments: the crop box (``resize``'s
``roi_start``/``roi_end``), the flip, the colour jitter and grayscale as one affine RGB transform
(``coord_transform`` with ``M``/``T``: ``views.color_matrices``) and the blur sigma
(``gaussian_blur``; a view not blurred gets sigma 1e-3, whose 3-tap kernel is the identity).
On CUDA the decoder is nvJPEG (``mixed``) and every op runs on the GPU; without a device
(``device_id=None``) the same graph runs on DALI's CPU operators, which the tests use.

Same frames, order, crops, flips and colour transforms as the threads backend; pixel values
differ by the resize filter's rounding (DALI's antialiased linear vs OpenCV's) — the tests bound
the difference. Solarization has no DALI operator here: a recipe asking for it is refused with
the backend to use instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from affpipe.loaders.pretrain import PretrainData, PretrainLoader, ViewBatch
from affpipe.loaders.views import ViewConfig, color_matrices, draw_views

_NO_BLUR = 1e-3


def _graph(*, n_views: int, size: int, gpu: bool, jpegs, params):
    from nvidia.dali import fn, types

    jpg = fn.external_source(source=jpegs, batch=True, batch_info=True, dtype=types.UINT8, ndim=1)
    img = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
    outs = []
    for v in range(n_views):
        start, end, flip, m, t, sigma = fn.external_source(source=params(v), num_outputs=6, batch=True,
                                                            batch_info=True)
        x = fn.resize(img, size=(size, size), roi_start=start, roi_end=end, roi_relative=False,
                      interp_type=types.INTERP_LINEAR, antialias=True)
        x = fn.flip(x, horizontal=flip, vertical=0)
        x = fn.coord_transform(x, M=m, T=t, dtype=types.UINT8)
        outs.append(fn.gaussian_blur(x, sigma=sigma))
    return tuple(outs)


class DaliPretrainLoader(PretrainLoader):
    """``PretrainLoader`` whose batches DALI decodes and augments (GPU on CUDA, else CPU)."""

    backend = "dali"

    def __init__(self, shards: Path, data: PretrainData, *, views: tuple[ViewConfig, ...], batch_size: int,
                 seed: int = 0, rank: int = 0, world: int = 1, num_workers: int = 2,
                 device: torch.device | str = "cpu") -> None:
        if any(v.solarize_p > 0 for v in views):
            raise ValueError("the DALI pre-training loader has no solarization: set solarize_p = 0 or use "
                             "backend = 'torch'")
        super().__init__(shards, data, views=views, batch_size=batch_size, seed=seed, rank=rank, world=world,
                         num_workers=num_workers, on_bad="error")
        self.device = torch.device(device)
        self._pipe = None
        self._feed: tuple[np.ndarray, int, int] | None = None  # (samples, seed, start batch)

    def _draws(self, b: int):
        samples, seed, _ = self._feed
        sel = samples[b * self.batch_size:(b + 1) * self.batch_size]
        return sel, draw_views(seed, b, len(sel), self.frame_size or (self.size, self.size), self.views_cfg)

    def _batch_of(self, info) -> int:
        if self._feed is None:
            raise StopIteration
        b = self._feed[2] + info.iteration
        if b >= self.num_batches:
            raise StopIteration
        return b

    def _pipeline(self):
        from nvidia.dali import pipeline_def

        if self._pipe is not None:
            return self._pipe
        gpu = self.device.type == "cuda"

        def jpegs(info):
            sel, _ = self._draws(self._batch_of(info))
            views = self.table.jpegs(sel)
            if views is None:
                raise ValueError(f"{self.data.splits}: a sample without its .jpg member (use backend='torch' to name it)")
            return views

        def params(v: int):
            def source(info):
                _, draws = self._draws(self._batch_of(info))
                p = draws[v]
                x0, y0, w, h = p.box.T.astype(np.float32)
                color = color_matrices(p).astype(np.float32)
                sigma = np.where(p.sigma > 0, p.sigma, _NO_BLUR).astype(np.float32)
                return ([np.array([a, b], np.float32) for a, b in zip(y0, x0, strict=True)],
                        [np.array([a, b], np.float32) for a, b in zip(y0 + h, x0 + w, strict=True)],
                        [np.array(f, np.int32) for f in p.flip.astype(np.int32)],
                        [np.ascontiguousarray(c[:, :3]) for c in color],
                        [np.ascontiguousarray(c[:, 3]) for c in color],
                        [np.array(s, np.float32) for s in sigma])
            return source

        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        pipe = pipeline_def(_graph, batch_size=self.batch_size, num_threads=max(1, self.threads), device_id=device_id,
                            seed=self.seed, prefetch_queue_depth=2)(
            n_views=len(self.views_cfg), size=self.size, gpu=gpu, jpegs=jpegs, params=params)
        pipe.build()
        self._pipe = pipe
        return pipe

    def _end_pass(self) -> None:
        if self._pipe is None:
            return
        self._feed = None
        try:
            while True:
                self._pipe.run()
        except StopIteration:
            pass
        self._pipe.reset()

    def __iter__(self) -> Iterator[ViewBatch]:
        start, epoch = self.take_start_batch(), self.epoch
        samples, seed = self.plan.samples(epoch)
        if start >= self.num_batches:
            return
        pipe = self._pipeline()
        self._end_pass()
        self._feed = (samples, seed, start)
        gpu = self.device.type == "cuda"
        for b in range(start, self.num_batches):
            outs = pipe.run()
            sel = samples[b * self.batch_size:(b + 1) * self.batch_size]
            records = self.table.records(sel)
            if records is None:
                raise ValueError(f"{self.data.splits}: a sample without its .lbl member (use backend='torch' to name it)")
            row_id = torch.from_numpy(records[:, :8].copy().view(np.int64).reshape(-1))
            if gpu:
                with torch.cuda.device(self.device):
                    views = [torch.from_dlpack(o.as_tensor()).clone() for o in outs]
            else:
                views = [torch.from_numpy(np.array(o.as_tensor())) for o in outs]
            yield ViewBatch([v.permute(0, 3, 1, 2) for v in views], row_id)
        self._end_pass()

    def close(self) -> None:
        """Release the DALI pipeline."""
        self._feed, self._pipe = None, None
