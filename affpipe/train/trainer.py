"""The trainer's state and its one training step, shared by ``train()`` and the benchmarks.

``Trainer.build(cfg, ctx, label_stats)`` makes the model, the task loss, the optimizer, the
plateau scheduler and the grad scaler exactly as a run uses them; ``Trainer.step(batch)`` is
the optimizer step every run takes (autocast forward, fp32 loss, scaled backward, step), so
``affpipe bench`` times the same step the trainer runs. ``state_dict``/``load_state_dict``
cover everything a checkpoint restores.

The step never reads a value back to the host (no ``.item()``, ``bool(tensor)``, device→host
copy): on a GPU the host queues step after step and only waits at the training loop's log and
checkpoint points (``tests/train/test_host_sync.py`` counts it). One exception is inherent:
``amp="fp16"``'s grad scaler checks for infinite gradients on the host every step; the default
bf16 needs no scaler.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from affpipe.dist import DistContext, autocast
from affpipe.run.checkpoint import rng_state, set_rng_state
from affpipe.run.config import TrainConfig, to_dict


@dataclass
class TrainState:
    """What a checkpoint restores besides the modules."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    best_score: float = -math.inf
    best_metrics: dict[str, Any] | None = None
    best_step: int = -1  # the step best.pt must hold (-1: none yet)
    epoch_acc: dict[str, float] = field(default_factory=dict)
    wall_time: float = 0.0  # seconds trained and validated, summed over resumed segments

    @classmethod
    def of_checkpoint(cls, ckpt: dict[str, Any]) -> TrainState:
        """The counters a checkpoint (``state_dict`` of any kind's trainer) holds."""
        return cls(epoch=ckpt["epoch"], step=ckpt["step"], step_in_epoch=ckpt["step_in_epoch"],
                   best_score=ckpt["best_score"], best_metrics=ckpt.get("best_metrics"),
                   best_step=int(ckpt.get("best_step", -1)), epoch_acc=dict(ckpt.get("epoch_acc", {})),
                   wall_time=float(ckpt.get("wall_time", 0.0)))


@dataclass
class Validation:
    """What one validation pass gives the loop (``Trainer.validation``; a kind's trainer may
    compute it its own way, e.g. the pre-training probe): the metrics, the frames scored, the
    stored predictions (``arrays()``, for intervals by video; None: none kept) and whether the
    state may become ``best.pt`` (``candidate``: false for a collapsed representation)."""

    metrics: dict[str, Any]
    frames: int
    arrays: Callable[[], dict[str, np.ndarray]] | None = None
    candidate: bool = True


def configure_device(device: torch.device) -> None:
    """Backend settings every run and benchmark on ``device`` shares (set here only): cudnn
    autotuning — the training shapes are fixed, so the fastest kernels are picked once."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names, over ``params``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Trainer:
    """Model, loss, optimizer, scheduler, scaler and counters of one run on one process."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, model: nn.Module, loss_fn: nn.Module, *,
                 channels_last: bool = True) -> None:
        self.cfg, self.ctx = cfg, ctx
        configure_device(ctx.device)
        on_gpu = ctx.device.type == "cuda"
        self.amp = cfg.amp if on_gpu else "none"
        # ``channels_last=False``: the model's input is not images (a temporal head's windows)
        self.channels_last = cfg.channels_last and on_gpu and channels_last
        self.raw_model = model
        self.loss_fn = loss_fn
        self.optimizer = make_optimizer(cfg, list(model.parameters()) + list(loss_fn.parameters()))
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.state = TrainState()
        # The video of each row id (set by the run's setup): validation intervals by video.
        self.row_videos: Callable[[np.ndarray], np.ndarray] | None = None
        self.val_batches: list[int] | None = None  # --max-val-steps: the batches validation scores
        self.best_predictions: dict[str, np.ndarray] | None = None  # the best validation's, for eval_predictions.npz
        self.model = model  # wrapped by wrap() (compile, DDP); raw_model is what is saved

    @classmethod
    def build(cls, cfg: TrainConfig, ctx: DistContext, label_stats: dict[str, Any]) -> Trainer:
        """The per-frame model of ``cfg`` on ``ctx.device`` with its loss (seeded: every rank
        starts from the same weights)."""
        from dataclasses import replace

        from affpipe.models.model import build_model, resolve_input
        from affpipe.scoring.tasks import MultiTaskLoss

        # The backbone's input (size, mean/std, interpolation) resolved: config.json records it.
        cfg = replace(cfg, model=resolve_input(cfg.model, cfg.image_size))
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model).to(ctx.device)
        if cfg.channels_last and ctx.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        loss_fn = MultiTaskLoss(cfg.heads, cfg.loss, label_stats).to(ctx.device)
        return cls(cfg, ctx, model, loss_fn)

    def wrap(self) -> None:
        """``torch.compile`` and DDP around the model, after any checkpoint was loaded."""
        if self.cfg.compile:
            self.model = torch.compile(self.model)
        if self.ctx.distributed:
            on_gpu = self.ctx.device.type == "cuda"
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=[self.ctx.device.index] if on_gpu else None)

    @property
    def eval_model(self) -> nn.Module:
        """The model validation runs: the unwrapped module, never the compiled one (eval mode and
        the partial last batch would each recompile it; DDP needs no gradient sync there)."""
        return self.raw_model

    def validation(self, loader) -> Validation:
        """The supervised validation pass over ``loader`` (reduced over ranks)."""
        from affpipe.train.evaluate import evaluate_model

        acc, frames = evaluate_model(self.eval_model, loader, self.cfg.heads, device=self.ctx.device, amp=self.amp,
                                     channels_last=self.channels_last, max_steps=self.cfg.max_val_steps,
                                     distributed=self.ctx.distributed, only=self.val_batches)
        return Validation(acc.compute(), frames, acc.state)

    # ---- one optimizer step ----------------------------------------------------------------

    def step(self, batch) -> dict[str, torch.Tensor]:
        """Forward (autocast), fp32 loss, backward, optimizer step; the loss parts, detached."""
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
                    tdist.all_reduce(p.grad)
                    p.grad /= self.ctx.world
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # Learned task weights are worth a curve; fixed ones are constants.
        keep = ("loss", "weight_") if self.cfg.loss.task_weighting == "uncertainty" else ("loss",)
        return {k: v.detach() for k, v in parts.items() if k.startswith(keep)}

    # ---- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything ``load_state_dict`` restores, as tensors and primitives."""
        s = self.state
        return {
            "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "loss": self.loss_fn.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": s.epoch, "step": s.step,
            "step_in_epoch": s.step_in_epoch, "best_score": s.best_score, "best_metrics": s.best_metrics,
            "best_step": s.best_step, "epoch_acc": s.epoch_acc, "wall_time": s.wall_time,
            "config": to_dict(self.cfg), "rng": rng_state(),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Restore modules, optimizer, scheduler, scaler, counters and RNG states."""
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.loss_fn.load_state_dict(ckpt["loss"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.state = TrainState.of_checkpoint(ckpt)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
