"""The pre-training kind of run: every crop, labelled or not → a self-supervised backbone
(``affpipe.run.kind.RunKind``; ``affpipe pretrain``).

Its data is an ``SSLData`` (shards, the split choice, the method and its recipe sections); it
trains with ``affpipe.train.loop`` unchanged — the run folder's claim, ``--resume`` mid-epoch,
``metrics.jsonl``, ``curves.png``, TensorBoard, the NaN stop, DDP — through a
:class:`PretrainTrainer` (the step, the learning-rate schedule, checkpoints) whose validation is
a probe: k-NN on the frozen backbone's features of labelled frames, per task (VA CCC, EXPR F1,
AU F1, P_MTL) on the validation split, with intervals by video; its score picks ``best.pt``, and a
collapsed representation is reported and never kept as the best. The backbone it leaves
initializes a per-frame model (``train --init RUN``, ``--weights RUN/best.pt``) and embeds frames
(``embed RUN``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from affpipe import dist, lineage
from affpipe.loaders.base import LoaderConfig
from affpipe.pretrain.recipe import lr_at, make_method, make_optimizer, recipe_of, set_lr
from affpipe.pretrain.stats import as_input, collapse_stats
from affpipe.run.checkpoint import rng_state, set_rng_state
from affpipe.run.config import SSLData, TrainConfig, to_dict
from affpipe.run.data import lineage_record, run_data_path
from affpipe.run.kind import OpenedData, RunKind, Setup
from affpipe.train.frames import frame_loader
from affpipe.train.trainer import TrainState, Validation

log = logging.getLogger(__name__)


class _Fixed:
    """No plateau scheduler: the recipe's cosine schedule sets the learning rate per step."""

    def step(self, score: float) -> None:
        pass


class PretrainTrainer:
    """The method (backbone + its heads), optimizer and counters of a pre-training run; the
    interface ``affpipe.train.loop.fit`` drives (``step``, ``validation``, ``state_dict``)."""

    def __init__(self, cfg: TrainConfig, ctx: dist.DistContext) -> None:
        from affpipe.train.trainer import configure_device

        self.cfg, self.ctx = cfg, ctx
        configure_device(ctx.device)
        self.recipe = recipe_of(cfg)
        torch.manual_seed(cfg.seed)
        self.raw_model = make_method(self.recipe)
        if cfg.model.init != "random":  # e.g. ImageNet, then SSL
            self.raw_model.init_report = init_backbone(self.raw_model.backbone, cfg)
        self.raw_model.to(ctx.device)
        self.model: nn.Module = self.raw_model
        self.optimizer = make_optimizer(self.raw_model, self.recipe, ctx.world)
        self.scheduler = _Fixed()
        self.amp = cfg.amp if ctx.device.type == "cuda" else "none"
        self.state = TrainState()
        self.steps_per_epoch = 1  # set when the loader is made
        self.row_videos = None
        self.best_predictions = None
        self.probe_loaders: tuple[Any, Any] | None = None

    def wrap(self) -> None:
        if self.ctx.distributed:
            on_gpu = self.ctx.device.type == "cuda"
            self.model = nn.parallel.DistributedDataParallel(self.raw_model,
                                                             device_ids=[self.ctx.device.index] if on_gpu else None)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, batch) -> dict[str, torch.Tensor]:
        from affpipe.dist import autocast

        s = self.state
        set_lr(self.optimizer, lr_at(self.recipe, s.epoch + s.step_in_epoch / max(self.steps_per_epoch, 1), self.ctx.world))
        views = [v.to(self.ctx.device, non_blocking=self.ctx.device.type == "cuda") for v in batch.views]
        with autocast(self.ctx.device, self.amp):
            parts = self.model(views)
        parts = {k: v.float() for k, v in parts.items()}
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        self.optimizer.step()
        return {k: v.detach() for k, v in parts.items()}

    def validation(self, loaders) -> Validation:
        """The k-NN probe on the frozen backbone (see :func:`probe`)."""
        return probe(self.raw_model, loaders, self.cfg, self.ctx.device)

    def state_dict(self) -> dict[str, Any]:
        s = self.state
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": s.epoch, "step": s.step, "step_in_epoch": s.step_in_epoch, "best_score": s.best_score,
                "best_metrics": s.best_metrics, "best_step": s.best_step, "epoch_acc": s.epoch_acc,
                "wall_time": s.wall_time, "config": to_dict(self.cfg), "rng": rng_state()}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        self.state = TrainState.of_checkpoint(ckpt)


def init_backbone(backbone: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """Start the backbone from ``cfg.model.init`` (the published weights, or a weight file)."""
    from affpipe.models.model import PUBLISHED

    if cfg.model.init in PUBLISHED:
        from affpipe.models.backbones import pretrained_state_dict
        from affpipe.models.weights import match_state

        state, source = pretrained_state_dict(cfg.model.arch)
        src, summary = match_state(state, backbone, drop=("fc.", "head.", "classifier."), source=str(source))
        backbone.load_state_dict(src, strict=False)
        log.info("pre-training starts from the published weights of %s (%s)", cfg.model.arch, source)
        return {**summary, "file": str(source), "published": cfg.model.arch}
    from affpipe.models.weights import load_into

    return load_into(backbone, cfg.model.init)


@torch.no_grad()
def features(backbone: nn.Module, loader, device: torch.device, limit: int | None = None):
    """l2-normalized pooled features of the loader's frames (eval mode) and their batches' labels."""
    was = backbone.training
    backbone.eval()
    feats, labels, n = [], [], 0
    try:
        for i, batch in enumerate(loader):
            if limit is not None and n >= limit:
                break
            feats.append(F.normalize(backbone(as_input(batch.images.to(device), 0)).float(), dim=1).cpu())
            labels.append({k: getattr(batch, k).cpu() for k in ("row_id", "va", "va_mask", "expr", "expr_mask",
                                                                  "au", "au_mask")})
            n += len(batch)
            del i
    finally:
        backbone.train(was)
    cat = {k: torch.cat([b[k] for b in labels]) for k in labels[0]} if labels else {}
    return (torch.cat(feats) if feats else torch.empty(0)), cat


def knn_outputs(query: torch.Tensor, memory: torch.Tensor, mem: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Per task, the k nearest labelled train frames' vote (cosine similarity; a neighbour counts for
    a task only where it has that task's label): VA their mean, EXPR log-shares, AU logits of the
    share of neighbours with the AU."""
    k = min(k, memory.shape[0])
    idx = (query @ memory.T).topk(k, dim=1).indices  # [N, k]
    out: dict[str, torch.Tensor] = {}
    m = mem["va_mask"][idx].float()  # [N, k]
    out["va"] = (mem["va"][idx] * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
    m = mem["expr_mask"][idx].float()
    votes = F.one_hot(mem["expr"][idx].clamp_min(0).long(), 8).float() * m[..., None]
    out["expr"] = torch.log((votes.sum(1) + 1e-3) / (m.sum(1, keepdim=True) + 8e-3))
    m = mem["au_mask"][idx].float()  # [N, k, 12]
    share = ((mem["au"][idx] * m).sum(1) / m.sum(1).clamp_min(1)).clamp(1e-4, 1 - 1e-4)
    out["au"] = torch.log(share / (1 - share))
    return out


def probe(method: nn.Module, loaders: tuple[Any, Any], cfg: TrainConfig, device: torch.device) -> Validation:
    """k-NN probe of ``method``'s frozen backbone: ``probe_frames`` labelled train frames as the
    memory, every validation frame scored per task (``MetricAccumulator``: VA CCC, EXPR F1, AU F1,
    P_MTL; the loop adds intervals by video), plus the collapse statistics of the validation
    features; a collapsed representation is reported and is no ``best.pt`` candidate."""
    from affpipe.scoring.metrics import MetricAccumulator

    train_loader, val_loader = loaders
    d: SSLData = cfg.data
    memory, mem = features(method.backbone, train_loader, device, d.probe_frames)
    query, q = features(method.backbone, val_loader, device,
                        None if cfg.max_val_steps is None else cfg.max_val_steps * cfg.batch_size)
    if not len(memory) or not len(query):
        raise ValueError(f"{d.shards}: the probe needs labelled train and val frames (train {len(memory)}, val "
                         f"{len(query)})")
    acc = MetricAccumulator(cfg.heads)
    for lo in range(0, len(query), 4096):
        part = slice(lo, lo + 4096)
        acc.update(knn_outputs(query[part], memory, mem, d.probe_k), {k: v[part] for k, v in q.items()})
    metrics = dict(acc.compute())
    stats = collapse_stats(query[: min(len(query), 4096)]) if len(query) >= 2 else {"collapsed": False}
    metrics.update({f"probe_{k}": v for k, v in stats.items() if k != "collapsed"}, collapsed=bool(stats["collapsed"]),
                   probe="knn", probe_k=min(d.probe_k, len(memory)), probe_memory=int(len(memory)))
    if stats["collapsed"]:
        log.warning("the representation has collapsed (spread %.2g, effective rank %.2f of the validation "
                    "features): this state is not kept as best.pt; lower the learning rate or check the views",
                    stats["spread"], stats["rank"])
    return Validation(metrics, int(len(query)), acc.state, candidate=not stats["collapsed"])


def _shards(cfg: TrainConfig) -> Path:
    if cfg.data.shards is None:
        raise ValueError("pretrain: no shards given (--shards)")
    return cfg.data.shards


class PretrainKind(RunKind):
    """Self-supervised pre-training (see the module docstring)."""

    name = "pretrain"
    data_type = SSLData
    data_flag = "--shards"

    def resolve(self, cfg: TrainConfig) -> TrainConfig:
        views = tuple(replace(v, size=cfg.image_size) for v in cfg.data.views)  # --image-size sets the views'
        return replace(cfg, data=replace(cfg.data, views=views)) if views != cfg.data.views else cfg

    def data_fingerprint(self, cfg: TrainConfig) -> str:
        from affpipe.shards.format import read_manifest
        from affpipe.shards.unlabelled import pretrain_fingerprint

        return lineage.fingerprint({"frames": pretrain_fingerprint(read_manifest(_shards(cfg), full=False)),
                                    "splits": list(cfg.data.data.splits)})

    def setup(self, cfg: TrainConfig, ctx: dist.DistContext, run: Path) -> Setup:
        from affpipe.loaders.pretrain import PretrainLoader, describe_data
        from affpipe.scoring.bootstrap import row_videos
        from affpipe.shards.format import shard_labels, shards_fingerprint

        cfg = self.resolve(cfg)
        shards = _shards(cfg)
        about = describe_data(shards, cfg.data.data)  # the splits exist, their counts are whole
        if about["unlabelled_note"] and ctx.main:
            log.warning("%s", about["unlabelled_note"])
        if cfg.data.data.allow_val and "val" in cfg.data.data.splits and ctx.main:
            log.warning("pre-training on the validation frames (--force-val): the probe's validation scores are "
                        "optimistic; the run records it")
        labels = shard_labels(shards, override=cfg.index)
        trainer = PretrainTrainer(cfg, ctx)
        trainer.row_videos = row_videos(labels.table)

        def loaders():
            train = PretrainLoader(shards, cfg.data.data, views=cfg.data.views, batch_size=cfg.batch_size,
                                   seed=cfg.seed, rank=ctx.rank, world=ctx.world,
                                   num_workers=cfg.loader.num_workers or dist.usable_cores(),
                                   on_bad=cfg.loader.on_bad, pin_memory=ctx.device.type == "cuda")
            steps = len(train) if not cfg.max_steps_per_epoch else min(len(train), cfg.max_steps_per_epoch)
            trainer.steps_per_epoch = steps
            # The probe reads labelled frames whole on every rank (the same scores everywhere, no reduce).
            probe_loaders = (frame_loader(shards, "train", cfg, ctx.device, train=False),
                             frame_loader(shards, "val", cfg, ctx.device, train=False))
            return train, probe_loaders

        rec = lineage_record(self.name, labels.table_name, lineage.rel_path(run, labels.index), labels.fingerprint,
                             shards=lineage.rel_path(run, shards), shards_fingerprint=shards_fingerprint(labels.manifest),
                             pretrain_fingerprint=about["fingerprint"], splits=about["splits"],
                             allow_val=about["allow_val"], transductive=about["transductive"],
                             frames=about["frames"], unlabelled_note=about["unlabelled_note"])
        what = (f"{cfg.data.method} on every frame of {' + '.join(cfg.data.data.splits)} of {shards}"
                f"{' (transductive: test crops)' if about['transductive'] else ''}")
        return Setup(trainer, loaders, what, rec)

    def open_data(self, ckpt: Path, cfg: TrainConfig, rec: dict[str, Any] | None, *,
                  inputs: tuple[Path, ...], index: Path | None, index_flag: bool) -> OpenedData:
        from affpipe.train.frames import FRAMES

        shards = run_data_path(ckpt.parent, (rec or {}).get("shards"), inputs[0] if inputs else None, cfg.data.shards)
        frames_cfg = replace(cfg, data=replace_data(cfg, shards))
        return FRAMES.open_data(ckpt, frames_cfg, rec, inputs=inputs, index=index, index_flag=index_flag)

    def restore_model(self, cfg: TrainConfig, state: dict[str, Any], data: OpenedData | None,
                      source: str) -> torch.nn.Module:
        raise ValueError(f"{source}: a pre-training run has no task heads to evaluate or predict with (its probe "
                         "scores are in its eval.json); fine-tune it with `affpipe train --init RUN` or embed "
                         "frames with `affpipe embed RUN`")

    def batches(self, cfg: TrainConfig, data: OpenedData, split: str, device: torch.device, *,
                batch_size: int | None = None, loader: LoaderConfig | None = None):
        return frame_loader(data.inputs[0], split, cfg, device, train=False, batch_size=batch_size, loader=loader)

    def frame_encoder(self, cfg: TrainConfig, state: dict[str, Any], source: str) -> torch.nn.Module:
        """A per-frame model (no heads trained) whose backbone is the pre-trained one."""
        from affpipe.models.model import build_model, resolve_input

        model = build_model(replace(resolve_input(cfg.model, cfg.image_size), init="random"))
        own = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
        try:
            model.backbone.load_state_dict(own)
        except RuntimeError as exc:
            first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc).splitlines()[0])
            raise ValueError(f"{source}: its backbone does not fit a {cfg.model.arch} ({first})") from None
        return model.eval()

    def describe(self, config: dict[str, Any]) -> dict[str, Any]:
        own = config.get("pretrain") or {}
        return {"method": own.get("method"), "splits": (own.get("data") or {}).get("splits")}


def replace_data(cfg: TrainConfig, shards: Path | None):
    """The per-frame data of a pre-training run's shards (what the probe and ``open_data`` read)."""
    from affpipe.run.config import ShardsData

    return ShardsData(shards, cfg.data.index)


PRETRAIN = PretrainKind()
