"""Window batches the per-frame trainer, loss and metrics take unchanged.

``align_labels`` puts the label table's labels in a feature table's row order.
``WindowLoader`` plays a shard loader's part for the training loop (``len``, ``set_epoch``,
iteration) and yields ``WindowBatch``: per-frame label fields (``va``, ``expr``, ``au``, their
masks, ``row_id``) for the frames the batch's outputs stand for, and in ``images`` a
``WindowInput`` that ``affpipe.temporal.heads.TemporalModel`` turns into exactly those per-frame outputs.

Training: each position of each window is one output frame (gaps masked out of the loss).
Evaluation: a batch holds whole stretches of videos; each row it *owns* gets the mean of the
outputs of every window covering it, so every frame is predicted exactly once. A long video is
cut into chunks; a chunk also carries the earlier windows that overlap the frames it owns.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import torch

from affpipe.labels import AU_NAMES, NUM_EXPR
from affpipe.temporal.windows import GAP, WindowPlan, epoch_order


@dataclass
class WindowInput:
    """Model input: features ``x [B,T,D]``, ``mask [B,T]`` (frame present), and ``target [B,T]``:
    the output row each position contributes to (-1: none), ``n_out`` rows."""

    x: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor
    n_out: int

    def to(self, device: torch.device | str, non_blocking: bool = True) -> WindowInput:
        return WindowInput(self.x.to(device, non_blocking=non_blocking), self.mask.to(device, non_blocking=non_blocking),
                           self.target.to(device, non_blocking=non_blocking), self.n_out)


@dataclass
class WindowBatch:
    """Same fields as ``affpipe.batch.Batch``; ``images`` is a ``WindowInput``."""

    images: WindowInput
    va: torch.Tensor
    expr: torch.Tensor
    au: torch.Tensor
    va_mask: torch.Tensor
    expr_mask: torch.Tensor
    au_mask: torch.Tensor
    row_id: torch.Tensor  # -1 at training positions without a frame
    frames: int = 0  # frames with a crop the batch holds (what len() and frames/s count)

    def __len__(self) -> int:
        return self.frames

    def to(self, device: torch.device | str, non_blocking: bool = True) -> WindowBatch:
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                 for f in fields(self) if f.name != "frames"}
        return WindowBatch(**moved, frames=self.frames)


@dataclass(frozen=True)
class RowLabels:
    """Per feature-table row: labels and masks (numpy), in the table's row order."""

    va: np.ndarray  # float32 [N,2]
    va_mask: np.ndarray  # bool [N]
    expr: np.ndarray  # int64 [N]
    expr_mask: np.ndarray  # bool [N]
    au: np.ndarray  # float32 [N,12]
    au_mask: np.ndarray  # bool [N,12]

    def take(self, rows: np.ndarray, present: np.ndarray) -> dict[str, torch.Tensor]:
        """Label tensors of ``rows`` (flat), masks false where ``present`` is false."""
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        return {"va": t(self.va[rows]), "va_mask": t(self.va_mask[rows] & present),
                "expr": t(self.expr[rows]), "expr_mask": t(self.expr_mask[rows] & present),
                "au": t(self.au[rows]), "au_mask": t(self.au_mask[rows] & present[:, None])}


def align_labels(table: pa.Table, row_id: np.ndarray) -> RowLabels:
    """Labels of the label-table rows ``row_id`` (a ``FRAMES_SCHEMA`` table), in that order."""
    ids = table.column("row_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    pos = np.clip(np.searchsorted(ids[order], row_id), 0, max(len(ids) - 1, 0))
    found = (ids[order][pos] == row_id) if len(ids) else np.zeros(len(row_id), bool)
    if not found.all():
        raise ValueError(f"{int((~found).sum())} feature rows have a row_id the label table lacks "
                         f"(first: {int(row_id[~found][0])}): was the feature table made from another index?")
    t = table.take(pa.array(order[pos]))
    col = lambda name: t.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    va = np.stack([col("valence"), col("arousal")], 1).astype(np.float32)
    va_mask = col("va_valid").astype(bool) & np.isfinite(va).all(1)
    expr = col("expr").astype(np.int64)
    expr_mask = col("expr_valid").astype(bool) & (expr >= 0) & (expr < NUM_EXPR)
    au = np.stack([col(a) for a in AU_NAMES], 1).astype(np.int64) if len(t) else np.zeros((0, len(AU_NAMES)), np.int64)
    au_mask = col("au_valid").astype(bool)[:, None] & (au >= 0)
    return RowLabels(va=np.nan_to_num(va), va_mask=va_mask, expr=np.where(expr_mask, expr, 0), expr_mask=expr_mask,
                     au=(au == 1).astype(np.float32), au_mask=au_mask)


def _features(features: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x float32 [B,T,D], mask [B,T])``: gathered from the (memory-mapped) fp16 matrix; gaps zero."""
    mask = rows != GAP
    flat = np.where(mask, rows, 0).reshape(-1)
    x = torch.from_numpy(features[flat].astype(np.float32)).reshape(*rows.shape, features.shape[1])
    m = torch.from_numpy(mask)
    return x * m.unsqueeze(-1), m


class WindowLoader:
    """Window batches over one split of a feature table (see the module docstring)."""

    backend = "windows"

    def __init__(self, features: np.ndarray, row_id: np.ndarray, labels: RowLabels, plan: WindowPlan, *,
                 batch_size: int, train: bool, seed: int = 0, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu") -> None:
        self.features, self.row_id, self.labels, self.plan = features, row_id, labels, plan
        self.device = torch.device(device)
        self.batch_size, self.train, self.seed, self.rank, self.world = batch_size, train, seed, rank, world
        self.epoch = 0
        if train:
            self.num_batches = (len(plan) // world) // batch_size
            if self.num_batches == 0:
                raise ValueError(f"{len(plan)} training windows over {world} rank(s) do not fill one batch of {batch_size}")
        else:
            self._lookup = np.full(len(row_id), -1, np.int64)  # row position → output row, per batch
            self.chunks = self._eval_chunks()
            self.num_batches = len(self.chunks)
        self.samples_per_epoch = self.num_batches * batch_size

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[WindowBatch]:
        if self.train:
            order = epoch_order(len(self.plan), self.seed, self.epoch)
            per_rank = len(order) // self.world
            order = order[self.rank * per_rank:(self.rank + 1) * per_rank]
            for b in range(self.num_batches):
                yield self._train_batch(order[b * self.batch_size:(b + 1) * self.batch_size]).to(self.device)
        else:
            for windows, owned in self.chunks:
                yield self._eval_batch(windows, owned).to(self.device)

    def _train_batch(self, windows: np.ndarray) -> WindowBatch:
        rows = self.plan.rows(windows)
        x, mask = _features(self.features, rows)
        present = mask.numpy().reshape(-1)
        flat = np.where(present, rows.reshape(-1), 0)
        target = torch.from_numpy(np.where(present, np.arange(present.size), -1).reshape(rows.shape))
        return WindowBatch(images=WindowInput(x, mask, target, present.size),
                           row_id=torch.from_numpy(np.where(present, self.row_id[flat], -1)),
                           frames=int(present.sum()), **self.labels.take(flat, present))

    def _eval_batch(self, windows: np.ndarray, owned: np.ndarray) -> WindowBatch:
        rows = self.plan.rows(windows)
        x, mask = _features(self.features, rows)
        lookup = self._lookup
        lookup[owned] = np.arange(len(owned))
        target = np.where(rows != GAP, lookup[np.where(rows != GAP, rows, 0)], -1)
        lookup[owned] = -1  # reset for the next batch
        return WindowBatch(images=WindowInput(x, mask, torch.from_numpy(target), len(owned)),
                           row_id=torch.from_numpy(self.row_id[owned]), frames=len(owned),
                           **self.labels.take(owned, np.ones(len(owned), bool)))

    def _eval_chunks(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(window indices, owned row positions)`` per batch: every row owned exactly once."""
        plan, T = self.plan, self.plan.length
        starts = plan.starts
        chunks: list[tuple[np.ndarray, np.ndarray]] = []
        pending_w: list[np.ndarray] = []
        pending_r: list[np.ndarray] = []
        bounds = np.flatnonzero(np.r_[True, plan.video_of_window[1:] != plan.video_of_window[:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):  # one video's windows [a, b)
            end = int(starts[b - 1]) + T
            for c in range(a, b, self.batch_size):
                # earlier windows that still reach into the frames this chunk owns
                lo = a + int(np.searchsorted(starts[a:c], starts[c] - T, side="right"))
                hi = min(b, c + self.batch_size)
                p0 = int(starts[a]) if c == a else int(starts[c])
                p1 = end if hi == b else int(starts[hi])
                seg = plan.timeline[p0:p1]
                pending_w.append(np.arange(lo, hi))
                pending_r.append(seg[seg != GAP])
                if sum(len(w) for w in pending_w) >= self.batch_size:
                    chunks.append((np.concatenate(pending_w), np.concatenate(pending_r)))
                    pending_w, pending_r = [], []
        if pending_w:
            chunks.append((np.concatenate(pending_w), np.concatenate(pending_r)))
        if self.world > 1:
            chunks = chunks[self.rank::self.world]
        return chunks
