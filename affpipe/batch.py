"""The one ``Batch`` every loader yields, and its construction from raw label records.

The trainer never asks which loader made a batch. Label records arrive as the raw 32-byte
``.lbl`` members (see ``affpipe.labels``) stacked into a ``uint8 [N, 32]`` tensor and are
decoded here with tensor views, so the decode costs the same on CPU and GPU and needs no
per-sample Python.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

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

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> Batch:
        """The batch on ``device``. Copies to an accelerator are asynchronous; copies to the CPU
        block by default (``non_blocking=None``): a device→host copy read before the stream
        reaches it would see stale memory."""
        if non_blocking is None:
            non_blocking = torch.device(device).type != "cpu"
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: through page-locked memory to CUDA (an asynchronous copy the
    host does not wait for; from pageable memory the driver stages it synchronously), as is
    elsewhere. The pinned buffer comes from torch's caching host allocator, which keeps it until
    the copy that reads it is done."""
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def decode_label_tensor(raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Decode ``uint8 [N, 32]`` label records into label and mask tensors on ``raw``'s device.

    Reads no value back to the host: on a GPU that would wait for all queued work (the previous
    training step included) on every batch. The record version is checked where the records
    are still on the host — by the loaders (``labels.record_problems``) and here for CPU input.
    """
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != RECORD_SIZE:
        raise ValueError(f"label records must be uint8 [N, {RECORD_SIZE}], got {raw.dtype} {tuple(raw.shape)}")
    raw = raw.contiguous()
    if raw.device.type == "cpu" and raw.shape[0]:
        version = raw.numpy()[:, 30]  # numpy on host memory: no tensor op, nothing to wait for
        if (version != RECORD_VERSION).any():
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


def fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off (the normalization runs in fp32); nothing to turn off on devices autocast
    does not know (``meta``, which the host-sync tests train on)."""
    if device.type not in ("cuda", "cpu", "xpu", "mps"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def normalize_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N,3,H,W]`` (any memory format) → float normalized, in fp32 even under autocast
    (``normalize_uint8``: the same arithmetic as a loader with ``normalize=True``)."""
    with fp32(images.device):
        if images.is_contiguous(memory_format=torch.channels_last):
            return normalize_uint8(images.permute(0, 2, 3, 1), channels_last=True)
        return normalize_uint8(images)


class InputNorm(nn.Module):
    """A model's first op: uint8 ``[N,3,H,W]`` → normalized float (``normalize_nchw``).

    Under ``torch.compile`` the constants are this module's buffers (graph inputs, moved with
    the model): traced, ``normalize_uint8``'s per-device cache is not a cache — dynamo would put
    the numpy tiling and a host→device copy of the constants into every forward. The compiled
    graph fuses the broadcast multiply-add into one kernel, so the row-tiling trick the eager
    CPU path needs buys nothing there. The buffers are not saved in checkpoints.
    """

    def __init__(self, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> None:
        super().__init__()
        scale = 1.0 / (np.array(std, np.float64) * 255.0)
        bias = -np.array(mean, np.float64) * 255.0 * scale
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            with fp32(images.device):
                return images.float() * self.scale + self.bias
        return normalize_nchw(images)
