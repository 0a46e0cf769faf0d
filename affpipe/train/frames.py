"""The per-frame kind of run: shards → backbone + task heads (``affpipe.run.kind.RunKind``).

Its data is a ``ShardsData`` (a shard folder and, optionally, the label index); the label table
is read once per command (``affpipe.shards.format.shard_labels``), and the model is the image
model of ``affpipe.models``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from affpipe import dist, lineage
from affpipe.loaders.base import LoaderConfig
from affpipe.run.config import ShardsData, TrainConfig
from affpipe.run.crops import CropModel
from affpipe.run.data import lineage_record, run_data_path
from affpipe.run.kind import CropContext, OpenedData, RunKind, Setup


def _shards(cfg: TrainConfig) -> Path:
    if cfg.data.shards is None:
        raise ValueError("train: no shards given (--shards)")
    return cfg.data.shards


def frame_loader(shards: Path, split: str, cfg: TrainConfig, device: torch.device, *, train: bool, rank: int = 0,
                 world: int = 1, batch_size: int | None = None, loader: LoaderConfig | None = None):
    """Batches of ``split`` of ``shards`` as ``cfg`` reads them (uint8: the model normalizes)."""
    from affpipe.loaders import make_loader

    return make_loader(shards, split, batch_size=batch_size or cfg.batch_size, train=train,
                       loader=loader if loader is not None else cfg.loader, device=device,
                       image_size=cfg.image_size, seed=cfg.seed, rank=rank, world_size=world, normalize=False)


class FramesKind(RunKind):
    """Per-frame runs (see the module docstring)."""

    name = "frames"
    title = "per-frame"
    data_type = ShardsData
    data_flag = "--shards"

    def resolve(self, cfg: TrainConfig) -> TrainConfig:
        from affpipe.models.model import resolve_input

        return replace(cfg, model=resolve_input(init_from_run(cfg.model), cfg.image_size))  # as config.json records it

    def data_fingerprint(self, cfg: TrainConfig) -> str:
        from affpipe.shards.format import read_manifest, shards_fingerprint

        return shards_fingerprint(read_manifest(_shards(cfg), full=False))

    def setup(self, cfg: TrainConfig, ctx: dist.DistContext, run: Path) -> Setup:
        from affpipe.scoring.bootstrap import row_videos
        from affpipe.scoring.tasks import label_statistics
        from affpipe.shards.format import shard_labels, shards_fingerprint
        from affpipe.train.trainer import Trainer

        shards = _shards(cfg)
        cfg = replace(cfg, model=init_from_run(cfg.model))
        labels = shard_labels(shards, override=cfg.index)  # frames.parquet, read once for the run
        trainer = Trainer.build(cfg, ctx, label_statistics(labels.table))
        trainer.row_videos = row_videos(labels.table)

        subset = LabelSubset.draw(labels.table, cfg.data.label_fraction, cfg.seed, ctx.device)

        def loaders():
            kw = dict(device=ctx.device, rank=ctx.rank, world=ctx.world)
            train = frame_loader(shards, "train", cfg, train=True, **kw)
            return (train if subset is None else subset.wrap(train),
                    frame_loader(shards, "val", cfg, train=False, **kw))

        extra = {} if subset is None else {"label_fraction": cfg.data.label_fraction, **subset.record}
        rec = lineage_record(self.name, labels.table_name, lineage.rel_path(run, labels.index), labels.fingerprint,
                             shards=lineage.rel_path(run, shards), shards_fingerprint=shards_fingerprint(labels.manifest),
                             **extra)
        return Setup(trainer, loaders, f"on {shards}", rec)

    def open_data(self, ckpt: Path, cfg: TrainConfig, rec: dict[str, Any] | None, *,
                  inputs: tuple[Path, ...], index: Path | None, index_flag: bool) -> OpenedData:
        from affpipe.shards.format import read_manifest, shard_labels

        if len(inputs) > 1:
            raise ValueError(f"--shards: {ckpt} reads one shard folder, {len(inputs)} given")
        shards = run_data_path(ckpt.parent, (rec or {}).get("shards"), inputs[0] if inputs else None,
                               cfg.data.shards)
        shards = _existing(shards, "shards", ckpt, self.data_flag)
        manifest = read_manifest(shards, full=False)
        # Other shards of the same label table (another sharding, the test split) are fine: what
        # must agree is the table the row ids refer to.
        lineage.check("label index", (rec or {}).get("index_fingerprint"), manifest.get("index_fingerprint"),
                      f"{ckpt} (what it trained on)", f"{shards}")
        if index is not None and not index_flag and not Path(index).exists():
            index = None  # an index the run recorded but that is gone: the one the shards name
        labels = shard_labels(shards, manifest, index)
        lineage.check("label index", (rec or {}).get("index_fingerprint"), labels.fingerprint,
                      f"{ckpt} (what it trained on)", f"{labels.index}")
        return OpenedData((shards,), labels.index, labels.table_name, labels.table)

    def restore_model(self, cfg: TrainConfig, state: dict[str, Any], data: OpenedData | None,
                      source: str) -> torch.nn.Module:
        from affpipe.models.model import build_model

        # The weights come from the checkpoint: never fetch ImageNet or another init here.
        model = build_model(replace(cfg.model, init="random"))
        return load_weights(model, state, source, f"a {cfg.model.arch} model with heads {list(cfg.heads)}")

    def batches(self, cfg: TrainConfig, data: OpenedData, split: str, device: torch.device, *,
                batch_size: int | None = None, loader: LoaderConfig | None = None):
        return frame_loader(data.inputs[0], split, cfg, device, train=False, batch_size=batch_size, loader=loader)

    def frame_encoder(self, cfg: TrainConfig, state: dict[str, Any], source: str) -> torch.nn.Module:
        return self.restore_model(cfg, state, None, source)

    def image_model(self, cfg: TrainConfig, state: dict[str, Any], source: str, ctx: CropContext) -> CropModel:
        from affpipe.run.crops import FrameCrops

        return FrameCrops(self.restore_model(cfg, state, None, source), cfg.image_size)

    def describe(self, config: dict[str, Any]) -> dict[str, Any]:
        return {}


class LabelSubset:
    """``label_fraction``: the labels of a seeded share of the train videos. The frames of the
    other videos are still read (the epoch plan is unchanged), their label masks are cleared on
    the device (a lookup by row id, no host sync), so the loss sees only the chosen videos'."""

    def __init__(self, keep: torch.Tensor, record: dict[str, Any]) -> None:
        self.keep, self.record = keep, record

    @classmethod
    def draw(cls, table, fraction: float, seed: int, device: torch.device) -> LabelSubset | None:
        """``ceil(fraction * videos)`` of the train split's videos (at least one), drawn by ``seed``
        from the sorted names; None for the whole split."""
        import math

        import numpy as np

        if fraction >= 1.0:
            return None
        split = table.column("split").to_numpy(zero_copy_only=False)
        video = table.column("video").to_numpy(zero_copy_only=False)
        rid = table.column("row_id").to_numpy()
        names = np.unique(video[split == "train"])
        n = max(1, math.ceil(fraction * len(names)))
        chosen = np.sort(np.random.default_rng(seed).choice(names, size=n, replace=False))
        keep = np.zeros(int(rid.max()) + 1 if len(rid) else 1, dtype=bool)
        keep[rid[np.isin(video, chosen)]] = True
        record = {"label_videos": int(n), "label_videos_of": int(len(names)),
                  "label_videos_fingerprint": lineage.fingerprint(chosen.tolist())}
        return cls(torch.from_numpy(keep).to(device), record)

    def wrap(self, loader):
        return _Masked(loader, self.keep)


class _Masked:
    """A train loader whose batches keep the labels of ``keep``'s rows only."""

    def __init__(self, loader, keep: torch.Tensor) -> None:
        self.loader, self.keep = loader, keep

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        from dataclasses import replace as dc_replace

        for batch in self.loader:
            k = self.keep[batch.row_id.to(self.keep.device).long().clamp(0, len(self.keep) - 1)]
            yield dc_replace(batch, va_mask=batch.va_mask & k, expr_mask=batch.expr_mask & k,
                             au_mask=batch.au_mask & k[:, None])


def init_from_run(model):
    """``--init RUN`` (a run folder, e.g. a pre-training run's) as the checkpoint it names: its
    ``best.pt``, else its ``last.pt``; anything else is kept as given."""
    from affpipe.run.folder import RunFolder

    path = Path(model.init)
    if model.init in ("random", "imagenet", "pretrained") or not path.is_dir():
        return model
    folder = RunFolder(path)
    ckpt = folder.best if folder.best.is_file() else folder.last
    if not ckpt.is_file():
        raise FileNotFoundError(f"--init {path}: a folder without a checkpoint ({folder.best.name} or "
                                f"{folder.last.name}); give a run folder or a weight file")
    return replace(model, init=str(ckpt))


def load_weights(model: torch.nn.Module, state: dict[str, Any], source: str, what: str) -> torch.nn.Module:
    """``state["model"]`` into ``model`` (eval mode); weights that do not fit are one error naming ``source``."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # torch's size-mismatch report spans many lines: keep the first
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc).splitlines()[0])
        raise ValueError(f"{source}: its weights do not fit {what} ({first})") from None
    return model.eval()


def _existing(path: Path | None, what: str, ckpt: Path, flag: str) -> Path:
    """A run's data path that must exist (one line suggesting ``flag`` otherwise)."""
    if path is None:
        raise ValueError(f"{ckpt}: no {what} recorded for this run; pass {flag}")
    if not Path(path).exists():
        raise FileNotFoundError(f"{ckpt}: its {what} {path} is not there (moved?); pass {flag} to point at it")
    return Path(path)


FRAMES = FramesKind()
