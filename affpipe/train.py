"""The training loop: uni-task and multi-task ResNet-18 on shards, single process or torchrun/DDP.

``train(cfg)`` fills a run folder: ``config.json``, ``metrics.jsonl``, ``last.pt`` (every epoch
and every ``ckpt_every`` steps), ``best.pt`` (best validation score), ``curves.png``,
``eval.json`` and ``eval.md``. Only rank 0 writes. ``cfg.resume`` continues a killed run from
``last.pt``, mid-epoch included, without repeating or losing a batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from affpipe.checkpoint import (
    config_differences,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    truncate_metrics,
)
from affpipe.config import TrainConfig, config_json, to_dict
from affpipe.evaluate import autocast, evaluate_model, jsonable, pick_device, write_eval

log = logging.getLogger(__name__)


@dataclass
class _Ctx:
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False  # train() initialized the process group, so it tears it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


@dataclass
class _State:
    """What a checkpoint restores besides the modules."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    best_score: float = -math.inf
    best_metrics: dict[str, Any] | None = None
    epoch_acc: dict[str, float] = field(default_factory=dict)
    wall_time: float = 0.0  # seconds trained and validated, summed over resumed segments


def _setup(cfg: TrainConfig) -> _Ctx:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Ctx(rank=rank, world=world, device=device, owns_group=owns)


def label_statistics_for(shards: Path) -> dict[str, Any]:
    """Class statistics of the train split of the label table the shard manifest names."""
    from affpipe.index import load_index
    from affpipe.tasks import label_statistics

    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    index = Path(manifest["index"])
    if not index.is_absolute() and not index.exists():
        index = Path(shards) / index
    table, _ = load_index(index, table=manifest.get("table", "frames"))
    return label_statistics(table)


def _make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _prepare_run_dir(cfg: TrainConfig, ctx: _Ctx) -> Path:
    out = cfg.out
    if out is None:
        raise ValueError("train: no run folder given (-o/--out)")
    if ctx.main:
        if cfg.resume:
            if not out.is_dir():
                raise FileNotFoundError(f"--resume: no run folder at {out}")
        elif (out / "last.pt").exists():
            raise FileExistsError(f"{out} already holds a run (last.pt); pass --resume to continue it or choose another -o")
        out.mkdir(parents=True, exist_ok=True)
    return out


def train(cfg: TrainConfig) -> Path:
    """Train ``cfg.task`` on ``cfg.shards`` into the run folder ``cfg.out``; returns the folder."""
    from affpipe.loaders import make_loader
    from affpipe.models import build_model
    from affpipe.tasks import MultiTaskLoss

    if cfg.shards is None:
        raise ValueError("train: no shards given (--shards)")
    ctx = _setup(cfg)
    run = _prepare_run_dir(cfg, ctx)
    on_gpu = ctx.device.type == "cuda"
    amp = cfg.amp if on_gpu else "none"
    if cfg.amp != "none" and not on_gpu and ctx.main:
        log.info("amp=%s ignored: autocast is used on GPU only (device %s)", cfg.amp, ctx.device)
    channels_last = cfg.channels_last and on_gpu

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts)
    model = build_model(cfg.model).to(ctx.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = MultiTaskLoss(cfg.heads, cfg.loss, label_statistics_for(cfg.shards)).to(ctx.device)
    optimizer = _make_optimizer(cfg, list(model.parameters()) + list(loss_fn.parameters()))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    state = _State()

    last = run / "last.pt"
    if cfg.resume and last.exists():
        ckpt = load_checkpoint(last, map_location=ctx.device)
        diffs = config_differences(ckpt["config"], to_dict(cfg))
        if diffs:
            raise ValueError(f"--resume: {last} was trained with another config; differences:\n  " + "\n  ".join(diffs))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        loss_fn.load_state_dict(ckpt["loss"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        state = _State(epoch=ckpt["epoch"], step=ckpt["step"], step_in_epoch=ckpt["step_in_epoch"],
                       best_score=ckpt["best_score"], best_metrics=ckpt.get("best_metrics"),
                       epoch_acc=dict(ckpt.get("epoch_acc", {})), wall_time=float(ckpt.get("wall_time", 0.0)))
        if ctx.main:
            truncate_metrics(run / "metrics.jsonl", step=state.step, epoch=state.epoch)
            log.info("resuming %s at epoch %d, step %d (%d batches into the epoch)",
                     run, state.epoch + 1, state.step, state.step_in_epoch)
    elif cfg.resume and ctx.main:
        log.warning("--resume: %s has no last.pt yet; starting from scratch", run)
    if ctx.main:
        (run / "config.json").write_text(config_json(cfg))

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ctx.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if on_gpu else None)

    loader_args = dict(backend=cfg.backend, device=ctx.device, image_size=cfg.image_size, seed=cfg.seed,
                       rank=ctx.rank, world_size=ctx.world, num_workers=cfg.num_workers,
                       normalize=False)  # uint8 batches: the model normalizes (models.normalize_input)
    train_loader = make_loader(cfg.shards, "train", batch_size=cfg.batch_size, train=True,
                               flip_p=cfg.flip_p, max_rotation=cfg.max_rotation, **loader_args)
    val_loader = make_loader(cfg.shards, "val", batch_size=cfg.batch_size, train=False, **loader_args)
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if ctx.distributed:  # every rank must take the same number of steps or DDP hangs
        n = torch.tensor([steps_per_epoch], device=ctx.device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        steps_per_epoch = int(n.item())
    if steps_per_epoch < 1:
        raise ValueError(f"{cfg.shards}: the train split gives no full batch of {cfg.batch_size} on this rank")
    if ctx.main:
        log.info("training %s on %s: %d steps/epoch x %d epochs, batch %d x %d process(es), loader %s, device %s",
                 cfg.task, cfg.shards, steps_per_epoch, cfg.epochs, cfg.batch_size, ctx.world,
                 getattr(train_loader, "backend", "?"), ctx.device)

    t_start, wall_base = time.perf_counter(), state.wall_time

    def checkpoint(path: Path) -> None:
        state.wall_time = wall_base + time.perf_counter() - t_start
        if ctx.main:
            save_checkpoint(path, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "loss": loss_fn.state_dict(), "scaler": scaler.state_dict(),
                "epoch": state.epoch, "step": state.step, "step_in_epoch": state.step_in_epoch,
                "best_score": state.best_score, "best_metrics": state.best_metrics,
                "epoch_acc": state.epoch_acc, "wall_time": state.wall_time, "config": to_dict(cfg), "rng": rng_state(),
            })

    loop = _Loop(cfg, ctx, model, loss_fn, optimizer, scaler, amp, channels_last, run, checkpoint)
    while state.epoch < cfg.epochs:
        epoch = state.epoch
        train_loader.set_epoch(epoch)
        loop.train_epoch(train_loader, state, steps_per_epoch)
        summary = {"kind": "epoch", "epoch": epoch, "step": state.step, "lr": optimizer.param_groups[0]["lr"],
                   **_epoch_means(state.epoch_acc)}
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            t0 = time.perf_counter()
            acc, frames = evaluate_model(model, val_loader, cfg.heads, device=ctx.device, amp=amp,
                                         channels_last=channels_last, max_steps=cfg.max_val_steps,
                                         distributed=ctx.distributed)
            metrics = jsonable(acc.compute())
            score = metrics.get(cfg.score_key)
            score = -math.inf if score is None else float(score)
            scheduler.step(score)
            improved = score > state.best_score
            if improved:
                state.best_score = score
                state.best_metrics = {**metrics, "frames": frames, "epoch": epoch, "step": state.step}
            summary.update(val={k: v for k, v in metrics.items() if not isinstance(v, dict)},
                           score_key=cfg.score_key, score=score, best_score=state.best_score,
                           val_frames=frames, val_time_s=time.perf_counter() - t0)
            if ctx.main:
                log.info("epoch %d/%d: val %s %.4f (best %.4f)", epoch + 1, cfg.epochs, cfg.score_key, score, state.best_score)
        else:
            improved = False
        state.epoch, state.step_in_epoch, state.epoch_acc = epoch + 1, 0, {}
        summary["wall_time"] = wall_base + time.perf_counter() - t_start
        if ctx.main:
            loop.log_record(summary)
            checkpoint(run / "last.pt")
            if improved:
                checkpoint(run / "best.pt")
            _plot(run)
    if ctx.main:
        _finish(run, cfg, state)
    if ctx.distributed:
        dist.barrier()
        if ctx.owns_group:
            dist.destroy_process_group()
    return run


def _epoch_means(acc: dict[str, float]) -> dict[str, float]:
    n = max(acc.get("batches", 0), 1)
    out = {f"train_{k.removeprefix('sum_')}": v / n for k, v in acc.items() if k.startswith("sum_")}
    if acc.get("time", 0) > 0:
        out["frames_per_s"] = acc["frames"] / acc["time"]
        out["data_wait_share"] = acc["wait"] / acc["time"]
    return out


def _plot(run: Path) -> None:
    from affpipe.plots import plot_curves

    try:
        plot_curves(run / "metrics.jsonl", run / "curves.png", title=run.name)
    except Exception as exc:  # a plot must never kill a long run
        log.warning("curves.png not drawn: %s", exc)


def _finish(run: Path, cfg: TrainConfig, state: _State) -> None:
    """``eval.json``/``eval.md`` from the validation pass that produced ``best.pt``."""
    if state.best_metrics is None:
        log.warning("no validation score was reached; eval.json not written")
        return
    result = dict(state.best_metrics)
    result.update(task=cfg.task, split="val", checkpoint="best.pt")
    if cfg.max_val_steps:
        result["note"] = f"validation limited to {cfg.max_val_steps} batches per pass"
    write_eval(run, result)
    _plot(run)


class _Loop:
    """One epoch of training: timing, logging, mid-epoch checkpoints."""

    def __init__(self, cfg, ctx, model, loss_fn, optimizer, scaler, amp, channels_last, run, checkpoint):
        self.cfg, self.ctx, self.model, self.loss_fn = cfg, ctx, model, loss_fn
        self.optimizer, self.scaler, self.amp, self.channels_last = optimizer, scaler, amp, channels_last
        self.metrics_path = run / "metrics.jsonl"
        self.checkpoint, self.run = checkpoint, run
        self.sync = cfg.sync_timing and ctx.device.type == "cuda"

    def log_record(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(jsonable(record)) + "\n")

    def _now(self) -> float:
        if self.sync:  # only on request: a sync per step costs GPU overlap
            torch.cuda.synchronize(self.ctx.device)
        return time.perf_counter()

    def step(self, batch) -> dict[str, torch.Tensor]:
        images = batch.images
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.ctx.device, self.amp):
            outputs = self.model(images)
        # The loss in fp32, outside autocast: CCC and BCE are sensitive to bf16 rounding.
        outputs = {k: v.float() for k, v in outputs.items()}
        parts = self.loss_fn(outputs, batch)
        loss = parts["loss"]
        if self.ctx.distributed:
            # Keeps every head in the graph even when a batch has no label for it, so DDP's
            # reducer sees a (zero) gradient for all parameters without find_unused_parameters.
            loss = loss + 0.0 * sum(o.sum() for o in outputs.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.ctx.distributed:  # the loss module (uncertainty weights) sits outside DDP
            for p in self.loss_fn.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.ctx.world
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # Learned task weights are worth a curve; fixed ones are constants.
        keep = ("loss", "weight_") if self.cfg.loss.task_weighting == "uncertainty" else ("loss",)
        return {k: v.detach() for k, v in parts.items() if k.startswith(keep)}

    def train_epoch(self, loader, state: _State, steps: int) -> None:
        cfg, ctx = self.cfg, self.ctx
        epoch = state.epoch
        it = iter(loader)
        skip = state.step_in_epoch
        if skip:
            # Loaders are deterministic given seed and epoch: iterating past the batches the
            # checkpoint already trained on lands exactly where the killed run stopped.
            for _ in tqdm(range(skip), desc=f"skipping {skip} trained batches", disable=not ctx.main, leave=False):
                next(it)
        acc = state.epoch_acc
        window: dict[str, Any] = {"sums": {}, "n": 0, "frames": 0, "wait": 0.0, "t0": self._now()}
        bar = tqdm(total=steps, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not ctx.main,
                   dynamic_ncols=True, mininterval=1.0)
        for i in range(skip, steps):
            t_wait = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                log.warning("loader ended after %d of %d batches in epoch %d", i, steps, epoch + 1)
                break
            wait = time.perf_counter() - t_wait
            parts = self.step(batch)
            frames = len(batch) * ctx.world
            for k, v in parts.items():
                window["sums"][k] = window["sums"].get(k, 0.0) + v
            window["n"] += 1
            window["frames"] += frames
            window["wait"] += wait
            state.step += 1
            state.step_in_epoch = i + 1
            bar.update(1)
            if window["n"] >= cfg.log_every or i + 1 == steps:
                self._flush(window, state, steps, acc, bar)
            if cfg.ckpt_every and state.step % cfg.ckpt_every == 0 and i + 1 < steps:
                self._flush(window, state, steps, acc, bar)  # logged steps never outrun the checkpoint
                self.checkpoint(self.run / "last.pt")
        bar.close()

    def _flush(self, window: dict[str, Any], state: _State, steps: int, acc: dict[str, float], bar) -> None:
        if window["n"] == 0:
            return
        ctx = self.ctx
        now = self._now()
        elapsed = max(now - window["t0"], 1e-9)
        names = sorted(window["sums"])
        sums = torch.stack([window["sums"][k].float() for k in names])
        if ctx.distributed:
            dist.all_reduce(sums)
            sums /= ctx.world
        means = dict(zip(names, (sums / window["n"]).tolist(), strict=True))  # the one sync per window
        for k, v in means.items():
            acc[f"sum_{k}"] = acc.get(f"sum_{k}", 0.0) + v * window["n"]
        acc["batches"] = acc.get("batches", 0) + window["n"]
        acc["frames"] = acc.get("frames", 0) + window["frames"]
        acc["wait"] = acc.get("wait", 0.0) + window["wait"]
        acc["time"] = acc.get("time", 0.0) + elapsed
        fps = window["frames"] / elapsed
        if ctx.main:
            self.log_record({"kind": "train", "epoch": state.epoch, "step": state.step,
                             "step_in_epoch": state.step_in_epoch, "steps_in_epoch": steps,
                             "lr": self.optimizer.param_groups[0]["lr"], **means,
                             "frames_per_s": fps, "data_wait_share": window["wait"] / elapsed})
            bar.set_postfix(loss=f"{means['loss']:.4f}", fps=f"{fps:.0f}", wait=f"{window['wait'] / elapsed:.0%}")
        window.update(sums={}, n=0, frames=0, wait=0.0, t0=now)
