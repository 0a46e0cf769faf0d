"""A temporal run over one face's crops (``affpipe.run.crops``): embed, then windows, averaged.

``TrackCrops`` holds the frozen encoders the run's feature tables were embedded with (fused
tables: one per table, concatenated in fusion order) and the temporal head. Each crop is
embedded as ``affpipe embed`` embeds a frame (the table's image size, the encoder's input op,
float16 features); the track's frames are laid out as one video's timeline (frames without a
crop are gaps, masked, never collapsed) and cut into evaluation windows (every
``eval_stride`` frames plus one ending at the last frame); each crop's output is the mean of the
outputs of every window covering it: what ``evaluate`` and ``predict`` give the same frames
through the feature table.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from affpipe.run.crops import CropModel, EncoderSpec, encode
from affpipe.temporal.windows import GAP, plan_windows


class TrackCrops(CropModel):
    """Encoders + temporal head (see the module docstring)."""

    def __init__(self, encoders: list[nn.Module], specs: list[EncoderSpec], head: nn.Module, *, window: int,
                 stride: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(e.eval() for e in encoders)
        self.specs = list(specs)
        self.head = head.eval()  # a TemporalModel: .head maps (x [B,T,D], mask [B,T]) to per-position outputs
        self.window, self.stride = int(window), int(stride)

    def features(self, images: np.ndarray, *, batch_size: int, device: torch.device) -> np.ndarray:
        """``float32 [N, D]``: every encoder's float16 features, concatenated (fusion order)."""
        parts = [encode(net, images, s.image_size, batch_size=batch_size, device=device)
                 for net, s in zip(self.encoders, self.specs, strict=True)]
        return np.concatenate(parts, axis=1).astype(np.float32) if len(images) else \
            np.zeros((0, sum(s.width for s in self.specs)), np.float32)

    def outputs(self, images: np.ndarray, frames: np.ndarray, *, batch_size: int,
                device: torch.device) -> dict[str, np.ndarray]:
        n = len(images)
        feats = self.features(images, batch_size=batch_size, device=device)
        if n == 0:
            return {}
        plan = plan_windows(np.zeros(n, np.int32), frames, np.arange(n), length=self.window, stride=self.stride,
                            cover=True)
        sums: dict[str, torch.Tensor] = {}
        counts = torch.zeros(n, dtype=torch.float64)
        x_all = torch.from_numpy(feats)
        with torch.inference_mode():
            for i in range(0, len(plan), batch_size):
                rows = torch.from_numpy(plan.rows(np.arange(i, min(i + batch_size, len(plan)))))
                mask = rows != GAP
                x = x_all[rows.clamp_min(0)] * mask.unsqueeze(-1)
                out = self.head.head(x.to(device), mask.to(device))
                idx = rows[mask]
                counts.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))
                for task, y in out.items():
                    flat = y.float().cpu()[mask].double()
                    if task not in sums:
                        sums[task] = torch.zeros(n, flat.shape[1], dtype=torch.float64)
                    sums[task].index_add_(0, idx, flat)
        return {t: (s / counts.clamp_min(1.0)[:, None]).float().numpy() for t, s in sums.items()}
