"""Temporal heads over windows of frame features: a TCN and a Transformer encoder.

``forward(x [B,T,D] float, mask [B,T] bool)`` returns per-frame outputs
``{"va": [B,T,2] in [-1,1], "expr": [B,T,8] logits, "au": [B,T,12] logits}`` for the tasks
configured. Gaps (``mask`` false) are zero inputs the TCN sees together with a "present"
channel, and keys the Transformer's attention ignores; their outputs are never scored.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from affpipe.models.model import HEAD_OUTPUTS
from affpipe.run.config import TemporalConfig


class _Block(nn.Module):
    """Residual dilated 1-d convolution block (non-causal: a frame sees both sides)."""

    def __init__(self, ch: int, kernel: int, dilation: int, dropout: float) -> None:
        super().__init__()
        pad = dilation * (kernel - 1) // 2
        self.conv1 = nn.Conv1d(ch, ch, kernel, padding=pad, dilation=dilation)
        self.conv2 = nn.Conv1d(ch, ch, 1)
        self.norm = nn.GroupNorm(1, ch)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.drop(torch.relu(self.norm(self.conv1(h * m)))))
        return h + y


class _Heads(nn.Module):
    """Per-frame linear heads on the raw features (the skip path: where a per-frame model
    stops) plus zero-initialized heads on the temporal context, summed before VA's tanh.

    At initialization the output is the skip path alone; ``frame.*`` can be copied from the
    per-frame checkpoint the features came from (``load_frame_heads``), so training starts at
    that model's predictions and the context learns the correction.
    """

    def __init__(self, in_dim: int, hidden: int, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.frame = nn.ModuleDict({t: nn.Linear(in_dim, HEAD_OUTPUTS[t]) for t in tasks})
        self.context = nn.ModuleDict({t: nn.Linear(hidden, HEAD_OUTPUTS[t]) for t in tasks})
        for layer in self.context.values():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {t: self.frame[t](x) + self.context[t](h) for t in self.frame}
        if "va" in out:
            out["va"] = torch.tanh(out["va"])
        return out


class TCNHead(nn.Module):
    """Input projection → ``layers`` residual blocks with dilations 1, 2, 4, … → per-frame heads."""

    def __init__(self, in_dim: int, cfg: TemporalConfig, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.in_norm = nn.LayerNorm(in_dim)  # backbone features arrive on any scale
        self.in_drop = nn.Dropout(cfg.input_dropout)
        self.proj = nn.Conv1d(in_dim + 1, cfg.hidden, 1)  # +1: the "frame present" channel
        self.blocks = nn.ModuleList(_Block(cfg.hidden, cfg.kernel, 2 ** i, cfg.dropout) for i in range(cfg.layers))
        self.out = _Heads(in_dim, cfg.hidden, tasks)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        m = mask.unsqueeze(1).to(x.dtype)  # [B,1,T]
        h = torch.cat([self.in_drop(self.in_norm(x)).transpose(1, 2) * m, m], dim=1)
        h = self.proj(h)
        for block in self.blocks:
            h = block(h, m)
        return self.out(x, h.transpose(1, 2))


def _sinusoid(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe


class TransformerHead(nn.Module):
    """Input projection + sinusoidal positions → pre-norm Transformer encoder → per-frame heads."""

    def __init__(self, in_dim: int, cfg: TemporalConfig, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.in_norm = nn.LayerNorm(in_dim)
        self.in_drop = nn.Dropout(cfg.input_dropout)
        self.proj = nn.Linear(in_dim, cfg.hidden)
        self.register_buffer("pos", _sinusoid(cfg.window, cfg.hidden), persistent=False)
        layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.attention_heads, dim_feedforward=2 * cfg.hidden,
                                           dropout=cfg.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.out = _Heads(in_dim, cfg.hidden, tasks)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        t = x.shape[1]
        if t > self.pos.shape[0]:
            raise ValueError(f"window of {t} frames is longer than the configured {self.pos.shape[0]}")
        h = self.proj(self.in_drop(self.in_norm(x))) + self.pos[:t]
        # A window with no frame at all would make attention NaN; such rows are never scored.
        pad = ~mask & mask.any(1, keepdim=True)
        h = self.encoder(h, src_key_padding_mask=pad)
        return self.out(x, self.norm(h))


def build_head(in_dim: int, cfg: TemporalConfig, tasks: tuple[str, ...]) -> nn.Module:
    """The temporal head ``cfg.arch`` for features of width ``in_dim``."""
    cls = TCNHead if cfg.arch == "tcn" else TransformerHead
    return cls(in_dim, cfg, tuple(tasks))


def load_frame_heads(head: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy a per-frame model's ``heads.<task>.*`` weights into the skip path; returns the tasks copied."""
    done = []
    for task, layer in getattr(head, "head", head).out.frame.items():
        w, b = state.get(f"heads.{task}.weight"), state.get(f"heads.{task}.bias")
        if w is not None and b is not None and w.shape == layer.weight.shape:
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(b)
            done.append(task)
    return done


class TemporalModel(nn.Module):
    """A temporal head behind the per-frame interface, so the trainer, ``evaluate_model`` and
    the loss take it unchanged: ``forward(WindowInput)`` → ``{task: [n_out, C]}``, each output
    row the mean of the window positions that map to it (``WindowInput.target``)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, inp) -> dict[str, torch.Tensor]:
        out = self.head(inp.x, inp.mask)
        target = inp.target.reshape(-1)
        keep = target >= 0
        idx = target[keep]
        ones = torch.ones(idx.shape[0], device=idx.device, dtype=torch.float32)
        counts = torch.zeros(inp.n_out, device=idx.device).index_add_(0, idx, ones).clamp_min(1.0)
        result = {}
        for task, value in out.items():
            flat = value.reshape(-1, value.shape[-1])[keep].float()
            sums = torch.zeros(inp.n_out, flat.shape[1], device=flat.device).index_add_(0, idx, flat)
            result[task] = sums / counts[:, None]
        return result


def build_temporal_model(in_dim: int, cfg: TemporalConfig, tasks: tuple[str, ...]) -> TemporalModel:
    """``TemporalModel`` around the head ``cfg.arch`` for features of width ``in_dim``."""
    return TemporalModel(build_head(in_dim, cfg, tasks))
