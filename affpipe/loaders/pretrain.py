"""The pre-training loader: every frame of the chosen splits, labelled or not, as augmented views.

Which splits pre-training reads is a recorded choice (:class:`PretrainData`): ``train`` by
default; the ``test`` crops (transductive pre-training: the test videos' faces, never their
labels — the test shards carry none) only when asked; ``val`` never, unless ``allow_val`` says so
on purpose (validation frames seen in pre-training make the validation score optimistic).

The frames are the split's labelled shards then its unlabelled shards
(``affpipe.shards.unlabelled.pretrain_shard_paths``), split after split; the epoch plan is the
supervised one (``affpipe.loaders.plan.EpochPlan``, train rules: seeded shard order, block
shuffle, drop-last), so ranks, resume at batch ``k`` and determinism work the same way. Each
batch is a :class:`ViewBatch`: one uint8 ``[N,3,H,W]`` tensor per view and the frames' row ids.
The views' draws come from ``(epoch seed, batch, view)`` (``affpipe.loaders.views``).

The labels in the records are never read here (an unlabelled shard's carry none anyway): a
pre-training batch is images and row ids only. Decoding runs on the torch backend's kind of
thread pool (OpenCV releases the GIL): each frame is decoded once and rendered into every view.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from affpipe.labels import RECORD_SIZE, SPLITS
from affpipe.loaders.base import Shard, check_shard
from affpipe.loaders.checks import SKIP_HINT
from affpipe.loaders.plan import EpochCursor, EpochPlan
from affpipe.loaders.source import MISSING, ShardTable
from affpipe.loaders.views import (
    ViewConfig,
    ViewParams,
    color_matrices,
    draw_views,
    render_view,
    view_size,
)
from affpipe.shards.format import (
    read_manifest,
    sample_key,
    split_frame_size,
)
from affpipe.shards.unlabelled import frame_counts, pretrain_shard_paths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainData:
    """Which splits pre-training reads (the ``[data]`` section of a pre-training recipe).

    ``splits``: ``("train",)`` by default; add ``"test"`` for transductive pre-training on the
    test crops; ``"val"`` is refused unless ``allow_val`` (``--force-val``).

    Where the frames are: ``shard --split train`` writes train's labelled and unlabelled shards;
    the test crops are the test split's own shards (every crop, records masked), written only by
    ``shard --split test`` or ``--split all`` — a shard folder without them cannot pre-train
    transductively, and says so."""

    splits: tuple[str, ...] = ("train",)
    allow_val: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", tuple(self.splits))
        if not self.splits:
            raise ValueError("data.splits must name at least one split (train by default)")
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"data.splits must be distinct splits of {SPLITS}, got {list(self.splits)}")
        if "val" in self.splits and not self.allow_val:
            raise ValueError("data.splits names 'val': validation frames are never pre-trained on (the validation "
                             "score would see them twice); set data.allow_val = true (--force-val) to do it anyway")

    @property
    def transductive(self) -> bool:
        """Whether the test crops are read (recorded in the run: its test scores are transductive)."""
        return "test" in self.splits

    def shard_pairs(self, shards: Path) -> list[tuple[Path, Path]]:
        """``(tar, idx)`` of every frame of the chosen splits: labelled then unlabelled, split by split."""
        manifest = read_manifest(shards, full=False)
        missing = [s for s in self.splits if s not in manifest["splits"]]
        if missing:
            raise ValueError(f"{Path(shards)}: no {', '.join(missing)} shards (has {sorted(manifest['splits'])}); "
                             f"write them with `affpipe shard --split {missing[0]}`")
        frame_counts(shards, manifest)  # a manifest whose counts were edited stops here
        return [p for s in self.splits for p in pretrain_shard_paths(shards, s, manifest)]


def describe_data(shards: Path, data: PretrainData) -> dict:
    """What a pre-training run records of its data (config and lineage): the split choice,
    labelled/unlabelled frames per chosen split, the plain note when they hold no unlabelled
    frame (``shards.unlabelled.unlabelled_note``; None otherwise) and the fingerprint of every frame
    read (``shards.unlabelled.pretrain_fingerprint``)."""
    from affpipe.shards.unlabelled import pretrain_fingerprint, unlabelled_note

    manifest = read_manifest(shards, full=False)
    data.shard_pairs(shards)  # the chosen splits exist and their counts are whole
    counts = frame_counts(shards, manifest)
    return {"splits": list(data.splits), "allow_val": data.allow_val, "transductive": data.transductive,
            "frames": {s: counts[s] for s in data.splits},
            "unlabelled_note": unlabelled_note(shards, data.splits, manifest),
            "fingerprint": pretrain_fingerprint(manifest)}


@dataclass
class ViewBatch:
    """A pre-training batch: ``views`` (one uint8 ``[N,3,H,W]`` tensor per view, channels_last
    memory) and ``row_id [N]`` (int64, the label table's row ids)."""

    views: list[torch.Tensor]
    row_id: torch.Tensor

    def __len__(self) -> int:
        return int(self.row_id.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> ViewBatch:
        """The batch on ``device`` (asynchronous to an accelerator, blocking to the CPU)."""
        if non_blocking is None:
            non_blocking = torch.device(device).type != "cpu"
        return ViewBatch([v.to(device, non_blocking=non_blocking) for v in self.views],
                         self.row_id.to(device, non_blocking=non_blocking))


def render_chunk(table: ShardTable, where: list[tuple[int, int, int]], params: list[ViewParams],
                 colors: list[np.ndarray], outs: list[np.ndarray], lo: int, hi: int,
                 frame_size: tuple[int, int] | None) -> list[int]:
    """Decode samples ``lo:hi`` once each and render every view; the positions that failed
    (missing, empty, undecodable, another frame size)."""
    import cv2

    bad = []
    for k in range(lo, hi):
        shard, off, n = where[k]
        img = None if off == MISSING or n == 0 else cv2.imdecode(table.views[shard][off:off + n], cv2.IMREAD_COLOR_RGB)
        if img is None or (frame_size is not None and img.shape[:2] != frame_size):
            bad.append(k)
            continue
        for p, color, out in zip(params, colors, outs, strict=True):
            render_view(img, p, k, color[k], out[k])
    return bad


class PretrainLoader(EpochCursor):
    """Every frame of ``data.splits`` as :class:`ViewBatch` es of ``len(views)`` views (CPU threads)."""

    backend = "torch"

    def __init__(self, shards: Path, data: PretrainData, *, views: tuple[ViewConfig, ...], batch_size: int,
                 seed: int = 0, rank: int = 0, world: int = 1, num_workers: int = 2, on_bad: str = "error",
                 pin_memory: bool = False) -> None:
        import tempfile

        if not views:
            raise ValueError("pre-training needs at least one view")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.views_cfg, self.size = tuple(views), view_size(tuple(views))
        self.data, self.batch_size, self.seed, self.on_bad = data, batch_size, seed, on_bad
        self.rank, self.world, self.pin_memory = rank, world, pin_memory
        self.skipped: dict[str, int] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="affpipe-idx-") if on_bad == "skip" else None
        self.shards: list[Shard] = []
        for tar, idx in data.shard_pairs(Path(shards)):
            shard, lost = check_shard(tar, idx, on_bad, Path(self._tmp.name) if self._tmp else None)
            for k, v in lost.items():
                self.skipped[k] = self.skipped.get(k, 0) + v
            if shard is not None and shard.samples:
                self.shards.append(shard)
        sizes = {s: split_frame_size(shards, s) for s in data.splits}
        known = {v for v in sizes.values() if v is not None}
        if len(known) > 1:
            raise ValueError(f"{shards}: the splits' frames differ in size ({sizes}); pre-train on one size")
        self.frame_size = known.pop() if known else None
        self.total = sum(s.samples for s in self.shards)
        self.num_batches = (self.total // world) // batch_size
        if self.num_batches == 0:
            raise ValueError(f"{shards} ({', '.join(data.splits)}): {self.total} frames over {world} rank(s) do not "
                             f"fill one batch of {batch_size}; use a smaller batch_size")
        self.samples_per_epoch = self.num_batches * batch_size
        self.plan = EpochPlan(tuple(s.samples for s in self.shards), seed, rank, world, True, batch_size,
                              self.num_batches)
        self.table = ShardTable(self.shards)
        self.threads = max(1, int(num_workers))
        self._pool: ThreadPoolExecutor | None = None
        self._epoch: tuple[int, np.ndarray, int] | None = None
        self.last_params: list[ViewParams] = []

    def __len__(self) -> int:
        return self.num_batches

    def _samples(self, epoch: int) -> tuple[np.ndarray, int]:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, *self.plan.samples(epoch))
        return self._epoch[1], self._epoch[2]

    def _submit(self, epoch: int, b: int) -> tuple:
        samples, seed = self._samples(epoch)
        sel = samples[b * self.batch_size:(b + 1) * self.batch_size]
        src = self.frame_size or (self.size, self.size)
        params = draw_views(seed, b, len(sel), src, self.views_cfg)
        colors = [color_matrices(p) for p in params]
        tensors = [torch.empty((len(sel), self.size, self.size, 3), dtype=torch.uint8, pin_memory=self.pin_memory)
                   for _ in params]
        outs = [t.numpy() for t in tensors]
        where = self.table.jpeg_where(sel)
        chunks = max(1, min(len(sel), 2 * self.threads))
        bounds = [len(sel) * i // chunks for i in range(chunks + 1)]
        futs: list[Future] = [self._pool.submit(render_chunk, self.table, where, params, colors, outs,
                                                bounds[i], bounds[i + 1], self.frame_size) for i in range(chunks)]
        return sel, params, tensors, futs

    def _result(self, pending: tuple) -> ViewBatch | None:
        sel, params, tensors, futs = pending
        bad = sorted(k for f in futs for k in f.result())
        records = self.table.records(sel)
        if records is None:
            missing = np.flatnonzero(self.table.lbl_sizes(sel) != RECORD_SIZE)
            bad = sorted(set(bad) | set(missing.tolist()))
            row_id = np.zeros(len(sel), np.int64)
        else:
            row_id = records[:, :8].copy().view(np.int64).reshape(-1)
        if bad:
            names = [f"{self.shards[int(sel[k][0])].tar}: sample {self._key(sel[k])}" for k in bad]
            if self.on_bad != "skip":
                raise ValueError(f"{names[0]}: missing, undecodable or of another frame size than the split's "
                                 f"({len(bad)} such in this batch; {SKIP_HINT})")
            for name in names[:5]:
                log.warning("%s: bad sample; skipped", name)
            self.skipped["bad_sample"] = self.skipped.get("bad_sample", 0) + len(bad)
            keep = np.setdiff1d(np.arange(len(sel)), bad)
            if not len(keep):
                return None
            tensors = [t[torch.from_numpy(keep)] for t in tensors]
            row_id = row_id[keep]
        self.last_params = params
        return ViewBatch([t.permute(0, 3, 1, 2) for t in tensors], torch.from_numpy(row_id))

    def _key(self, pair) -> str:
        from affpipe.shards.format import parse_idx

        shard, j = (int(v) for v in pair)
        return sample_key(parse_idx(self.shards[shard].idx)[j])

    def __iter__(self) -> Iterator[ViewBatch]:
        start, epoch = self.take_start_batch(), self.epoch
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="affpipe-views")
        pending: deque = deque()
        nxt = start
        try:
            while nxt < self.num_batches and len(pending) < self.threads + 1:
                pending.append(self._submit(epoch, nxt))
                nxt += 1
            while pending:
                item = self._result(pending.popleft())
                if nxt < self.num_batches:
                    pending.append(self._submit(epoch, nxt))
                    nxt += 1
                if item is not None:
                    yield item
        finally:
            for p in pending:
                for f in p[-1]:
                    f.cancel()
            for p in pending:  # the buffers stay alive until their chunks are done
                for f in p[-1]:
                    if not f.cancelled():
                        f.exception()

    def close(self) -> None:
        """Stop the decode threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

