"""Training a temporal head on a feature table: the per-frame run's machinery, unchanged.

``train_temporal(cfg)`` (``cfg.features`` set) builds a ``TemporalModel`` and ``WindowLoader``s
and hands them to the same ``Trainer``, ``fit``/``train_one_epoch``/``validate``, masked
multi-task loss, metrics, checkpoints (``last.pt``/``best.pt``), resume, ``metrics.jsonl``,
``curves.png`` and ``eval.json`` as per-frame runs. The feature table's manifest names the
label index, so the features are the only input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from affpipe import dist
from affpipe.temporal.data import RowLabels, WindowLoader, align_labels
from affpipe.temporal.features import FeatureTable, open_features, source_checkpoint
from affpipe.temporal.heads import TemporalModel, build_temporal_model, load_frame_heads
from affpipe.temporal.windows import plan_windows
from affpipe.run.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TemporalData:
    """A feature table with the labels of its rows and the label table they came from."""

    table: FeatureTable
    labels: RowLabels
    label_table: pa.Table
    index: Path  # the label index, resolved (a relative path in the manifest is from the features folder)

    @classmethod
    def open(cls, features: Path | Sequence[Path], index: Path | None = None) -> TemporalData:
        """Open ``features`` checked against its label index (``index`` overrides the one its
        manifest names; see :func:`affpipe.temporal.features.open_features`); several tables are
        fused (:mod:`affpipe.temporal.fused`: the same index, row for row, concatenated)."""
        from affpipe.temporal.fused import fuse_tables

        paths = [features] if isinstance(features, str | Path) else list(features)
        table = fuse_tables([open_features(p, index=index) for p in paths])
        assert table.label_table is not None and table.index is not None
        return cls(table, align_labels(table.label_table, table.row_id), table.label_table, table.index)

    def loader(self, split: str, cfg: TrainConfig, *, train: bool, device: torch.device, rank: int = 0,
               world: int = 1, batch_size: int | None = None) -> WindowLoader:
        """Window batches of ``split`` (training windows every ``stride``, evaluation every ``eval_stride``)."""
        t, tc = self.table, cfg.temporal
        rows = t.rows_of(split)
        if not len(rows):
            raise ValueError(f"{t.path}: no rows of split {split!r} (embed it with --split {split} or all)")
        plan = plan_windows(t.video, t.frame, rows, length=tc.window,
                            stride=tc.stride if train else tc.resolved_eval_stride, cover=True)
        return WindowLoader(t.features, t.row_id, self.labels, plan, batch_size=batch_size or cfg.batch_size,
                            train=train, seed=cfg.seed, rank=rank, world=world, device=device)


def build_model_for(cfg: TrainConfig, dim: int, table: FeatureTable | None = None) -> TemporalModel:
    """The temporal model of ``cfg`` over features of width ``dim``; with ``table`` (the feature
    table) and ``init_frame_heads``, its skip path starts from the source checkpoint's heads."""
    from affpipe.run.checkpoint import load_checkpoint

    torch.manual_seed(cfg.seed)
    model = build_temporal_model(dim, cfg.temporal, cfg.heads)
    source = source_checkpoint(table.path.parent, table.manifest) if table is not None else None
    if cfg.temporal.init_frame_heads and source is not None:
        if source.is_file():
            done = load_frame_heads(model, load_checkpoint(Path(source), map_location="cpu")["model"])
            log.info("per-frame heads %s initialized from %s", done or "(none matched)", source)
        else:
            log.warning("init_frame_heads: the source checkpoint %s is gone; per-frame heads start fresh", source)
    return model


def temporal_setup(cfg: TrainConfig, ctx: dist.DistContext):
    """``affpipe.train.loop.train``'s setup for a temporal head on ``cfg.features``: the model over
    feature windows, its loss, and window loaders."""
    from affpipe.scoring.bootstrap import row_videos
    from affpipe.scoring.tasks import MultiTaskLoss, label_statistics
    from affpipe.train.trainer import Trainer

    if cfg.features is None:
        raise ValueError("train_temporal: no feature table given (--features)")
    data = TemporalData.open(cfg.features, cfg.index)
    model = build_model_for(cfg, data.table.dim, data.table).to(ctx.device)
    loss_fn = MultiTaskLoss(cfg.heads, cfg.loss, label_statistics(data.label_table)).to(ctx.device)

    def loaders():
        kw = dict(device=ctx.device, rank=ctx.rank, world=ctx.world)
        return data.loader("train", cfg, train=True, **kw), data.loader("val", cfg, train=False, **kw)

    what = f"with a {cfg.temporal.arch} head over windows of {cfg.temporal.window} frames of {' + '.join(map(str, cfg.feature_tables))}"
    trainer = Trainer(cfg, ctx, model, loss_fn)
    trainer.row_videos = row_videos(data.label_table)  # validation intervals by video
    return trainer, loaders, what


def temporal_lineage(cfg: TrainConfig, run: Path) -> dict:
    """What a temporal run trains on (``affpipe.run.data``): its feature table(s) and the
    label index they were checked against (``cfg.index`` overrides the one the manifest names)."""
    from affpipe.index.build import index_fingerprint
    from affpipe.lineage import rel_path
    from affpipe.temporal.features import features_fingerprint, manifest_index_path, read_manifest

    tables = cfg.feature_tables  # fused tables share their index (checked when they are opened)
    manifests = [read_manifest(f) for f in tables]
    manifest = manifests[0]
    table = manifest.get("table", "frames")
    index = Path(cfg.index) if cfg.index is not None else manifest_index_path(tables[0], manifest)
    return {"kind": "temporal", "table": table, "index": rel_path(run, index),
            "index_fingerprint": manifest.get("index_fingerprint") or index_fingerprint(index, table),
            "shards": None, "shards_fingerprint": None, "features": [rel_path(run, f) for f in tables],
            "features_fingerprint": [features_fingerprint(m) for m in manifests]}


def train_temporal(cfg: TrainConfig, *, overwrite: bool = False) -> Path:
    """Train a temporal head on ``cfg.features`` into the run folder ``cfg.out``; returns the folder."""
    from affpipe.train.loop import train

    return train(cfg, setup=temporal_setup, lineage=temporal_lineage, overwrite=overwrite)


def train_any(cfg: TrainConfig, *, overwrite: bool = False) -> Path:
    """``train_temporal`` for a run on a feature table, the per-frame ``train`` otherwise
    (``overwrite``: start afresh in a folder holding a run)."""
    from affpipe.train.loop import train

    return train_temporal(cfg, overwrite=overwrite) if cfg.is_temporal else train(cfg, overwrite=overwrite)
