"""The one ``Batch`` every loader yields, and its construction from raw label records.

The trainer never asks which loader made a batch. Label records arrive as the raw 32-byte
``.lbl`` members (see ``affpipe.labels``) stacked into a ``uint8 [N, 32]`` tensor and are
decoded here with tensor views, so the decode costs the same on CPU and GPU and needs no
per-sample Python.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import numpy as np
import torch

from affpipe.labels import FLAG_AU, FLAG_EXPR, FLAG_VA, NUM_AU, RECORD_SIZE, RECORD_VERSION

# ImageNet statistics (torchvision's Normalize in the research's pipeline).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class Batch:
    """A training batch. ``images`` is float ``[N,3,H,W]``, normalized, on the training device.

    ``va [N,2]`` float, ``expr [N]`` int64, ``au [N,12]`` float (0/1); ``va_mask [N]``,
    ``expr_mask [N]``, ``au_mask [N,12]`` bool (per AU: a missing or invalid AU is masked);
    ``row_id [N]`` int64 (the label table's stable row id).
    """

    images: torch.Tensor
    va: torch.Tensor
    expr: torch.Tensor
    au: torch.Tensor
    va_mask: torch.Tensor
    expr_mask: torch.Tensor
    au_mask: torch.Tensor
    row_id: torch.Tensor

    def __len__(self) -> int:
        return int(self.row_id.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})


def decode_label_tensor(raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Decode ``uint8 [N, 32]`` label records into label and mask tensors on ``raw``'s device."""
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != RECORD_SIZE:
        raise ValueError(f"label records must be uint8 [N, {RECORD_SIZE}], got {raw.dtype} {tuple(raw.shape)}")
    raw = raw.contiguous()
    version = raw[:, 30]
    if raw.shape[0] and bool((version != RECORD_VERSION).any()):
        raise ValueError(f"label record version {int(version.max())} != {RECORD_VERSION}; reshard")
    row_id = raw[:, 0:8].contiguous().view(torch.int64).reshape(-1)
    va = raw[:, 8:16].contiguous().view(torch.float32)
    au = raw[:, 16:16 + NUM_AU].view(torch.int8)
    expr = raw[:, 28].view(torch.int8)
    flags = raw[:, 29]
    va_mask = (flags & FLAG_VA) != 0
    expr_mask = (flags & FLAG_EXPR) != 0
    au_mask = (au >= 0) & ((flags & FLAG_AU) != 0).unsqueeze(1)
    return {
        "va": torch.nan_to_num(va, nan=0.0),
        "expr": expr.long().clamp_min(0),
        "au": au.clamp_min(0).float(),
        "va_mask": va_mask,
        "expr_mask": expr_mask,
        "au_mask": au_mask,
        "row_id": row_id,
    }


def make_batch(images: torch.Tensor, raw_labels: torch.Tensor) -> Batch:
    """A ``Batch`` from normalized images and raw ``uint8 [N, 32]`` records (same device)."""
    return Batch(images=images, **decode_label_tensor(raw_labels))


@functools.cache
def _row_np(width: int) -> tuple[np.ndarray, np.ndarray]:
    """``x * scale + bias`` == ``(x / 255 - MEAN) / STD`` for one NHWC image row (``width*3``)."""
    scale = 1.0 / (np.array(STD, np.float64) * 255.0)
    bias = -np.array(MEAN, np.float64) * 255.0 * scale
    return np.tile(scale, width).astype(np.float32), np.tile(bias, width).astype(np.float32)


@functools.cache
def _row_dev(width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``_row_np(width)`` on ``device`` (copied there once)."""
    scale, bias = _row_np(width)
    return torch.from_numpy(scale).to(device), torch.from_numpy(bias).to(device)


@functools.cache
def _chw_dev(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean * 255, 1 / (std * 255))`` as ``[1,3,1,1]`` on ``device`` (copied there once)."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255.0
    return mean, 1.0 / (torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255.0)


def normalize_uint8(images: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
    """uint8 ``[N,3,H,W]`` (or NHWC when ``channels_last``) → float normalized NCHW.

    NHWC input gives a channels_last NCHW result with no copy. The multiply-add runs over whole
    image rows (``W*3`` contiguous values against a row-tiled scale and bias): broadcasting a
    size-3 innermost channel axis defeats vectorization and was 5x slower on a CPU.
    """
    if not channels_last:
        mean, inv = _chw_dev(images.device)
        return (images.float() - mean).mul_(inv)
    n, h, w, c = images.shape
    if c != 3:
        raise ValueError(f"expected NHWC images with 3 channels, got shape {tuple(images.shape)}")
    if images.device.type == "cpu":
        # numpy's elementwise loops run on the calling thread: the loaders' decode threads keep
        # the cores, where torch's intra-op pool would compete with them (measured: 2 threads
        # made the DALI CPU loader ~25% slower) — and no global thread setting is touched.
        out = images.numpy().reshape(n * h, w * c).astype(np.float32)  # new memory (DALI reuses its own)
        scale, bias = _row_np(w)
        np.multiply(out, scale, out=out)
        np.add(out, bias, out=out)
        return torch.from_numpy(out).view(n, h, w, c).permute(0, 3, 1, 2)
    scale, bias = _row_dev(w, images.device)
    out = images.reshape(n * h, w * c).float()
    out.mul_(scale).add_(bias)
    return out.view(n, h, w, c).permute(0, 3, 1, 2)
