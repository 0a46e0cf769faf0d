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
from affpipe.run.data import lineage_record, run_data_path
from affpipe.run.kind import OpenedData, RunKind, Setup


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

        def loaders():
            kw = dict(device=ctx.device, rank=ctx.rank, world=ctx.world)
            return (frame_loader(shards, "train", cfg, train=True, **kw),
                    frame_loader(shards, "val", cfg, train=False, **kw))

        rec = lineage_record(self.name, labels.table_name, lineage.rel_path(run, labels.index), labels.fingerprint,
                             shards=lineage.rel_path(run, shards), shards_fingerprint=shards_fingerprint(labels.manifest))
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

    def describe(self, config: dict[str, Any]) -> dict[str, Any]:
        return {}


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
