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

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from affpipe.batch import Batch, decode_label_tensor
from affpipe.labels import RECORD_SIZE, record_problems, records_from_table
from affpipe.loaders.plan import EpochCursor
from affpipe.temporal.features import FeatureTable, open_features
from affpipe.temporal.windows import GAP, WindowPlan, epoch_order, plan_windows

if TYPE_CHECKING:
    from affpipe.run.config import TrainConfig


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
class WindowBatch(Batch):
    """A ``Batch`` whose ``images`` is a ``WindowInput`` (the one difference that matters to the
    trainer: the model takes windows of features) and whose ``len()`` counts the frames with a
    crop it holds (``frames``; what frames/s count), not its label rows. ``row_id`` is -1 at
    training positions without a frame."""

    frames: int = 0

    def __len__(self) -> int:
        return self.frames

    def to(self, device: torch.device | str, non_blocking: bool = True) -> WindowBatch:
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                 for f in fields(self) if f.name != "frames"}
        return WindowBatch(**moved, frames=self.frames)


@dataclass(frozen=True)
class RowLabels:
    """Per feature-table row, in the table's row order: the ``.lbl`` records the shards would
    carry (``affpipe.labels.records_from_table``: test rows unlabelled, out-of-range values
    refused), decoded per batch by ``affpipe.batch.decode_label_tensor``, the loaders' decoder."""

    records: torch.Tensor  # uint8 [N, RECORD_SIZE]

    def __len__(self) -> int:
        return int(self.records.shape[0])

    def take(self, rows: np.ndarray, present: np.ndarray) -> dict[str, torch.Tensor]:
        """Label tensors of ``rows`` (flat), masks false where ``present`` is false."""
        out = decode_label_tensor(self.records[torch.from_numpy(np.asarray(rows, np.int64))])
        out.pop("row_id")
        keep = torch.from_numpy(np.asarray(present, bool))
        for k in ("va_mask", "expr_mask"):
            out[k] = out[k] & keep
        out["au_mask"] = out["au_mask"] & keep[:, None]
        return out


def align_labels(table: pa.Table, row_id: np.ndarray, source: str = "the label table") -> RowLabels:
    """Labels of the label-table rows ``row_id`` (a ``FRAMES_SCHEMA`` table, read from
    ``source``), in that order, through the same records and checks as the shards' labels."""
    ids = table.column("row_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    pos = np.clip(np.searchsorted(ids[order], row_id), 0, max(len(ids) - 1, 0))
    found = (ids[order][pos] == row_id) if len(ids) else np.zeros(len(row_id), bool)
    if not found.all():
        raise ValueError(f"{int((~found).sum())} feature rows have a row_id {source} lacks "
                         f"(first: {int(row_id[~found][0])}): was the feature table made from another index?")
    raw = records_from_table(table.take(pa.array(order[pos]))).view(np.uint8).reshape(-1, RECORD_SIZE)
    problems = record_problems(raw)
    if problems:
        raise ValueError(f"{source}: {len(problems)} rows hold labels out of range; first: {problems[0][1]}")
    return RowLabels(torch.from_numpy(np.ascontiguousarray(raw)))


def _features(features: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x float32 [B,T,D], mask [B,T])``: gathered from the (memory-mapped) fp16 matrix; gaps zero."""
    mask = rows != GAP
    flat = np.where(mask, rows, 0).reshape(-1)
    x = torch.from_numpy(features[flat].astype(np.float32)).reshape(*rows.shape, features.shape[1])
    m = torch.from_numpy(mask)
    return x * m.unsqueeze(-1), m


class WindowLoader(EpochCursor):
    """Window batches over one split of a feature table (see the module docstring). Epochs and
    mid-epoch starts follow the shard loaders' mechanism (``EpochCursor``): ``set_epoch(e,
    start_batch=k)`` makes the next pass yield batches ``k, k+1, ...`` of epoch ``e``'s order,
    without building the ones before."""

    backend = "windows"

    def __init__(self, features: np.ndarray, row_id: np.ndarray, labels: RowLabels, plan: WindowPlan, *,
                 batch_size: int, train: bool, seed: int = 0, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu") -> None:
        self.features, self.row_id, self.labels, self.plan = features, row_id, labels, plan
        self.device = torch.device(device)
        self.batch_size, self.train, self.seed, self.rank, self.world = batch_size, train, seed, rank, world
        if train:
            self.num_batches = (len(plan) // world) // batch_size
            if self.num_batches == 0:
                raise ValueError(f"{len(plan)} training windows over {world} rank(s) do not fill one batch of "
                                 f"{batch_size}; pass a smaller --batch-size (at most {len(plan) // world})")
        else:
            self._lookup = np.full(len(row_id), -1, np.int64)  # row position → output row, per batch
            self.chunks = self._eval_chunks()
            self.num_batches = len(self.chunks)
        self.samples_per_epoch = self.num_batches * batch_size

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[WindowBatch]:
        start = self.take_start_batch()
        if self.train:
            order = epoch_order(len(self.plan), self.seed, self.epoch)
            per_rank = len(order) // self.world
            order = order[self.rank * per_rank:(self.rank + 1) * per_rank]
            for b in range(start, self.num_batches):
                yield self._train_batch(order[b * self.batch_size:(b + 1) * self.batch_size]).to(self.device)
        else:
            for windows, owned in self.chunks[start:]:
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

    def batch_rows(self) -> list[np.ndarray]:
        """The row ids each validation batch scores (nothing built): what picks limited
        validation batches."""
        if self.train:
            raise ValueError("batch_rows: validation loaders only")
        return [self.row_id[owned] for _, owned in self.chunks]

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


@dataclass(frozen=True)
class TemporalData:
    """A feature table with the labels of its rows and the label table they came from."""

    table: FeatureTable
    labels: RowLabels
    label_table: pa.Table
    index: Path  # the label index, resolved (a relative path in the manifest is from the features folder)
    tables: tuple[FeatureTable, ...] = ()  # each table as opened, in fusion order

    @classmethod
    def open(cls, features: Path | Sequence[Path], index: Path | None = None) -> TemporalData:
        """Open ``features`` checked against its label index (``index`` overrides the one its
        manifest names; see :func:`affpipe.temporal.features.open_features`); several tables are
        fused (:mod:`affpipe.temporal.fused`: the same index, row for row, concatenated)."""
        from affpipe.temporal.fused import fuse_tables

        paths = [features] if isinstance(features, str | Path) else list(features)
        tables = tuple(open_features(p, index=index) for p in paths)
        table = fuse_tables(list(tables))
        assert table.label_table is not None and table.index is not None
        return cls(table, align_labels(table.label_table, table.row_id), table.label_table, table.index, tables)

    def loader(self, split: str, cfg: TrainConfig, *, train: bool, device: torch.device, rank: int = 0,
               world: int = 1, batch_size: int | None = None) -> WindowLoader:
        """Window batches of ``split`` (training windows every ``stride``, evaluation every ``eval_stride``)."""
        t, tc = self.table, cfg.data.temporal
        rows = t.rows_of(split)
        if not len(rows):
            raise ValueError(f"{t.path}: no rows of split {split!r} (embed it with --split {split} or all)")
        plan = plan_windows(t.video, t.frame, rows, length=tc.window,
                            stride=tc.stride if train else tc.resolved_eval_stride, cover=True)
        return WindowLoader(t.features, t.row_id, self.labels, plan, batch_size=batch_size or cfg.batch_size,
                            train=train, seed=cfg.seed, rank=rank, world=world, device=device)
