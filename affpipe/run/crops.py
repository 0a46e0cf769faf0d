"""What ``Run.predict`` and ``predict --video`` run: a model over one face's aligned crops.

A kind of run gives a ``CropModel`` (``RunKind.image_model``): uint8 RGB crops ``[N, H, W, 3]``
of one face **in time order**, with their frame numbers (gaps kept: a frame without a crop is
missing from ``frames``), to raw outputs ``{task: float32 [N, C]}`` (VA already tanh, EXPR and AU
logits), one row per crop. A per-frame model (``FrameCrops``) reads each crop alone, so the order
does not matter to it; a temporal one (``affpipe.temporal.crops.TrackCrops``) reads the track:
its frozen encoders embed every crop as ``affpipe embed`` did, and the head's windows over the
frames are averaged where they overlap, as ``evaluate`` averages them.

Crops are resized to the size a model was trained at with the loaders' resize
(``affpipe.loaders.augment.resize_linear``), then the model's own input op normalizes them.

An encoder (the frozen backbone a feature table was embedded with) is described by an
``EncoderSpec``: enough to rebuild it without its source (``affpipe export`` of a temporal run
carries its encoders' tensors and specs, so the file alone predicts on crops).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn


class CropModel(nn.Module):
    """The interface (see the module docstring); ``outputs`` is the one method callers use."""

    def outputs(self, images: np.ndarray, frames: np.ndarray, *, batch_size: int,
                device: torch.device) -> dict[str, np.ndarray]:
        raise NotImplementedError


def check_frames(frames: np.ndarray | None, n: int) -> np.ndarray:
    """``frames`` as int64 (``None``: ``0..n-1``); one error unless one strictly increasing
    number per crop."""
    if frames is None:
        return np.arange(n, dtype=np.int64)
    f = np.asarray(frames)
    if f.shape != (n,) or (n and not np.issubdtype(f.dtype, np.integer)):
        raise ValueError(f"predict: frames must be {n} integer frame numbers (one per crop), got {f.dtype} {list(f.shape)}")
    f = f.astype(np.int64)
    if n > 1 and not (np.diff(f) > 0).all():
        raise ValueError("predict: frames must increase strictly (the crops of one face, in time order)")
    return f


def _chunks(images: np.ndarray, size: int, batch_size: int, device: torch.device):
    """``images`` in chunks of ``batch_size``, resized to ``size`` as the loaders resize, as
    uint8 ``[B, 3, size, size]`` tensors on ``device``."""
    from affpipe.loaders.augment import resize_linear

    for i in range(0, len(images), batch_size):
        chunk = np.stack([resize_linear(np.ascontiguousarray(a), size) for a in images[i:i + batch_size]])
        yield torch.from_numpy(chunk).permute(0, 3, 1, 2).contiguous().to(device)


class FrameCrops(CropModel):
    """A per-frame model: each crop alone, at the run's image size."""

    def __init__(self, model: nn.Module, size: int) -> None:
        super().__init__()
        self.model, self.size = model.eval(), int(size)

    def outputs(self, images: np.ndarray, frames: np.ndarray, *, batch_size: int,
                device: torch.device) -> dict[str, np.ndarray]:
        outs: dict[str, list[np.ndarray]] = {}
        with torch.inference_mode():
            for x in _chunks(images, self.size, batch_size, device):
                for task, y in self.model(x).items():
                    outs.setdefault(task, []).append(y.float().cpu().numpy())
        return {t: np.concatenate(v) for t, v in outs.items()}


@dataclass(frozen=True)
class EncoderSpec:
    """A frozen encoder as a feature table records it: the resolved model config that rebuilds
    it (``affpipe.models.model.ModelConfig`` as a dict), the frames' size at embedding, the
    feature width, and where its weights came from (source and sha256)."""

    model: dict[str, Any]
    image_size: int
    width: int
    source: str = ""
    source_sha256: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> EncoderSpec:
        try:
            return cls(model=dict(d["model"]), image_size=int(d["image_size"]), width=int(d["width"]),
                       source=str(d.get("source", "")), source_sha256=str(d.get("source_sha256", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: an encoder record without {exc}") from None

    def build(self) -> nn.Sequential:
        """The encoder's structure (random weights): its input op, then its backbone."""
        from affpipe.models.model import ModelConfig, build_model

        cfg = ModelConfig(**{**self.model, "init": "random"})
        model = build_model(cfg)
        return nn.Sequential(model.input_norm, model.backbone).eval()


def spec_of(model_cfg, image_size: int, width: int, source: str, sha256: str) -> EncoderSpec:
    """The ``EncoderSpec`` of an encoder built from ``model_cfg`` (a ``ModelConfig``)."""
    from affpipe.models.model import resolve_input

    resolved = replace(resolve_input(model_cfg, image_size), init="random")
    d = asdict(resolved)
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    return EncoderSpec(model=d, image_size=int(image_size), width=int(width), source=source, source_sha256=sha256)


def encode(net: nn.Module, images: np.ndarray, size: int, *, batch_size: int, device: torch.device) -> np.ndarray:
    """Features ``float16 [N, D]`` of ``images`` through ``net`` (input op + backbone), as a
    feature table stores them."""
    parts = []
    with torch.inference_mode():
        for x in _chunks(images, size, batch_size, device):  # embed's memory layout: the same kernels
            parts.append(net(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy().astype(np.float16))
    if not parts:
        return np.zeros((0, 0), np.float16)
    return np.concatenate(parts)
