"""Task losses: masked VA / EXPR / AU losses and their fixed or learned (uncertainty) weighting.

Tasks own their losses: ``MultiTaskLoss(tasks, cfg, stats)(outputs, batch)`` returns a dict with
``loss`` (the training loop only calls ``backward()`` on it) and its parts. Every loss is a
masked mean, so a frame only trains the heads it has labels for, and a head without a single
valid label in the batch contributes exactly zero loss and zero gradient (no NaN): masked
targets are replaced before any arithmetic, means divide by a count clamped to 1, and the
learned task weights are gated by "this head had labels".

Everything is computed in float32 (outputs may arrive in bf16/fp16 under autocast) and without
host synchronisation (no ``.item()``, no data-dependent Python branches).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn

from affpipe.labels import AU_NAMES, NUM_AU, NUM_EXPR, TASKS

log = logging.getLogger(__name__)

VA_LOSSES = ("ccc", "mse")
WEIGHTINGS = ("fixed", "uncertainty")
POS_WEIGHT_CLIP = (1.0, 50.0)
_EPS = 1e-8


@dataclass(frozen=True)
class LossConfig:
    """Loss options. ``task_weights`` are for (va, expr, au), whichever of them are trained."""

    va_loss: str = "ccc"
    expr_class_weights: bool = True
    au_pos_weight: bool = True
    task_weighting: str = "fixed"
    task_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "task_weights", tuple(float(w) for w in self.task_weights))
        if self.va_loss not in VA_LOSSES:
            raise ValueError(f"LossConfig.va_loss must be one of {VA_LOSSES}, got {self.va_loss!r}")
        if self.task_weighting not in WEIGHTINGS:
            raise ValueError(f"LossConfig.task_weighting must be one of {WEIGHTINGS}, got {self.task_weighting!r}")
        if len(self.task_weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in self.task_weights):
            raise ValueError(f"LossConfig.task_weights must be 3 finite non-negative floats (va, expr, au), "
                             f"got {self.task_weights}")


def label_statistics(table: pa.Table, split: str | None = "train") -> dict[str, Any]:
    """Label counts of one split (``None``: all rows) of a ``FRAMES_SCHEMA`` table, valid labels only.

    Returns ``{"split", "rows", "va_count", "expr_counts" [8], "au_pos" [12], "au_neg" [12]}``
    with plain ints (JSON- and checkpoint-friendly).
    """
    if split is not None:
        table = table.filter(pc.equal(table.column("split"), split))
    col = lambda name: table.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    expr_valid = col("expr_valid").astype(bool)
    expr = col("expr").astype(np.int64)[expr_valid]
    expr = expr[(expr >= 0) & (expr < NUM_EXPR)]
    au_valid = col("au_valid").astype(bool)
    au = np.stack([col(a) for a in AU_NAMES], axis=1)[au_valid] if len(table) else np.zeros((0, NUM_AU))
    return {
        "split": split,
        "rows": int(len(table)),
        "va_count": int(col("va_valid").astype(bool).sum()),
        "expr_counts": np.bincount(expr, minlength=NUM_EXPR).astype(int).tolist(),
        "au_pos": (au == 1).sum(0).astype(int).tolist(),
        "au_neg": (au == 0).sum(0).astype(int).tolist(),
    }


def expr_class_weights(stats: Mapping[str, Any]) -> torch.Tensor:
    """Inverse-frequency class weights, normalized to mean 1 over the classes present.

    A class with no training label gets weight 0: it cannot occur in a training batch drawn
    from the same split, and an unbounded weight would only hide that.
    """
    counts = np.asarray(stats["expr_counts"], np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("expr_class_weights: no valid EXPR label in the statistics")
    inv = np.zeros_like(counts)
    inv[present] = 1.0 / counts[present]
    return torch.tensor(inv / inv[present].mean(), dtype=torch.float32)


def au_pos_weights(stats: Mapping[str, Any], clip: tuple[float, float] = POS_WEIGHT_CLIP) -> torch.Tensor:
    """Per-AU BCE ``pos_weight`` = negatives / positives, clipped to ``clip`` (no positive → the upper bound)."""
    pos = np.asarray(stats["au_pos"], np.float64)
    neg = np.asarray(stats["au_neg"], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(pos > 0, neg / np.maximum(pos, 1), np.where(neg > 0, np.inf, 1.0))
    return torch.tensor(np.clip(ratio, *clip), dtype=torch.float32)


def _field(batch: Any, name: str) -> torch.Tensor:
    return batch[name] if isinstance(batch, Mapping) else getattr(batch, name)


def masked_ccc_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - mean CCC`` over the masked rows of ``[N,2]`` predictions; 0 (and no gradient) with < 2 rows."""
    w = mask.float().unsqueeze(1)
    n = w.sum()
    target = torch.where(w > 0, target, torch.zeros_like(target))
    denom = n.clamp_min(1.0)
    mp = (pred * w).sum(0) / denom
    mt = (target * w).sum(0) / denom
    dp, dt = (pred - mp) * w, (target - mt) * w
    vp, vt = (dp * dp).sum(0) / denom, (dt * dt).sum(0) / denom
    cov = (dp * dt).sum(0) / denom
    ccc = 2.0 * cov / (vp + vt + (mp - mt) ** 2 + _EPS)
    return (1.0 - ccc.mean()) * (n >= 2).float()


def masked_mse_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked rows (both dimensions); 0 with no valid row."""
    w = mask.float().unsqueeze(1)
    target = torch.where(w > 0, target, torch.zeros_like(target))
    return (((pred - target) ** 2) * w).sum() / (2.0 * w.sum()).clamp_min(1.0)


def masked_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """(Class-weighted) cross-entropy over the masked rows, normalized like PyTorch's weighted mean."""
    target = torch.where(mask, target.long(), torch.zeros_like(target, dtype=torch.long))
    per = F.cross_entropy(logits, target, weight=weight, reduction="none")
    w = mask.float() if weight is None else mask.float() * weight[target]
    return (per * mask.float()).sum() / w.sum().clamp_min(_EPS)


def masked_bce(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, pos_weight: torch.Tensor | None
) -> torch.Tensor:
    """BCE-with-logits (per-AU ``pos_weight``) averaged over the valid (row, AU) entries."""
    m = mask.float()
    target = torch.where(mask, target.float(), torch.zeros_like(m))
    per = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    return (per * m).sum() / m.sum().clamp_min(1.0)


class MultiTaskLoss(nn.Module):
    """Masked per-task losses combined with fixed weights or learned uncertainty weights.

    Uncertainty weighting (Kendall, Gal & Cipolla 2018): one learned log-variance ``s_t`` per
    task, ``loss = sum_t w_t * (exp(-s_t) * L_t + s_t)`` over the tasks with labels in the batch.
    Its parameters live in this module: give ``loss_fn.parameters()`` to the optimizer too.
    ``stats`` (from ``label_statistics``) supplies the class weights and ``pos_weight``; without
    it both are uniform.
    """

    def __init__(self, tasks: Sequence[str], cfg: LossConfig | None = None, stats: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ValueError(f"MultiTaskLoss: tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        self.cfg = cfg or LossConfig()
        if stats is None and (self.cfg.expr_class_weights or self.cfg.au_pos_weight):
            log.warning("MultiTaskLoss: no label statistics given; class weights and pos_weight are uniform")
        use_cw = "expr" in self.tasks and self.cfg.expr_class_weights and stats is not None
        use_pw = "au" in self.tasks and self.cfg.au_pos_weight and stats is not None
        # Buffers follow the module to the training device.
        self.register_buffer("class_weight", expr_class_weights(stats) if use_cw else None)
        self.register_buffer("pos_weight", au_pos_weights(stats) if use_pw else None)
        self.register_buffer(
            "task_weight", torch.tensor([self.cfg.task_weights[TASKS.index(t)] for t in self.tasks], dtype=torch.float32)
        )
        if self.cfg.task_weighting == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))
        else:
            self.log_vars = None

    def task_losses(self, outputs: Mapping[str, torch.Tensor], batch: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per task: (masked loss, 1.0 if the task had enough labels in the batch else 0.0)."""
        parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if "va" in self.tasks:
            pred, mask = outputs["va"].float(), _field(batch, "va_mask").bool()
            target = _field(batch, "va").float()
            if self.cfg.va_loss == "ccc":
                loss, present = masked_ccc_loss(pred, target, mask), (mask.sum() >= 2).float()
            else:
                loss, present = masked_mse_loss(pred, target, mask), mask.any().float()
            parts["va"] = (loss, present)
        if "expr" in self.tasks:
            mask = _field(batch, "expr_mask").bool()
            loss = masked_cross_entropy(outputs["expr"].float(), _field(batch, "expr"), mask, self.class_weight)
            parts["expr"] = (loss, mask.any().float())
        if "au" in self.tasks:
            mask = _field(batch, "au_mask").bool()
            loss = masked_bce(outputs["au"].float(), _field(batch, "au"), mask, self.pos_weight)
            parts["au"] = (loss, mask.any().float())
        return parts

    def forward(self, outputs: Mapping[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
        """``{"loss", "loss_<task>", "weight_<task>", ["log_var_<task>"]}`` for the trained tasks."""
        parts = self.task_losses(outputs, batch)
        total = torch.zeros((), device=self.task_weight.device)
        out: dict[str, torch.Tensor] = {}
        for i, task in enumerate(self.tasks):
            loss, present = parts[task]
            if self.log_vars is not None:
                s = self.log_vars[i]
                # Gated by `present` so a head without labels also leaves its s_t untouched.
                term = self.task_weight[i] * (torch.exp(-s) * loss + s) * present
                weight = self.task_weight[i] * torch.exp(-s.detach())
                out[f"log_var_{task}"] = s.detach()
            else:
                term = self.task_weight[i] * loss
                weight = self.task_weight[i]
            total = total + term
            out[f"loss_{task}"] = loss
            out[f"weight_{task}"] = weight
        out["loss"] = total
        return out
