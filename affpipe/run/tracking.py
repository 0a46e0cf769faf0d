"""TensorBoard event files written from the records of ``metrics.jsonl`` (the source of truth).

``TensorBoardSink(run).record(rec)`` is called with every record ``RunLog.write`` appends, so the
event files hold exactly what the log holds, at the same steps: ``train/<key>`` for each number of
a ``train`` record (total and per-task loss, learned task weights, lr, frames/s, data-wait
share), ``epoch/<key>`` for an ``epoch`` record's numbers and ``val/<metric>`` for its
validation metrics. Nothing is read from the device: records are host numbers already, so no
host sync is added. ``first_batch`` draws a grid of a first batch's images with their labels
(once per run, a copy to the host). A resumed run passes ``purge_step`` (the first step it logs
again): TensorBoard then hides what a killed process had logged from there on, as
``metrics.jsonl`` is truncated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Record fields that are positions, not curves.
_POSITION = ("epoch", "step", "step_in_epoch", "steps_in_epoch")
GRID_IMAGES = 16


def _numbers(rec: Mapping[str, Any]):
    for key, value in rec.items():
        if key in _POSITION or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            yield key, float(value)


class TensorBoardSink:
    """Event files in the run folder, fed from ``metrics.jsonl`` records."""

    def __init__(self, run: Path, purge_step: int | None = None) -> None:
        from affpipe._optional import import_summary_writer

        writer = import_summary_writer()
        self.writer = writer(log_dir=str(run), purge_step=purge_step, flush_secs=30)
        log.info("TensorBoard event files in %s (tensorboard --logdir %s)", run, run.parent)

    def record(self, rec: Mapping[str, Any]) -> None:
        """Scalars of one ``metrics.jsonl`` record, at its ``step``."""
        kind, step = rec.get("kind"), int(rec.get("step", 0))
        if kind == "train":
            for key, value in _numbers(rec):
                self.writer.add_scalar(f"train/{key}", value, step)
        elif kind == "epoch":
            for key, value in _numbers(rec):
                self.writer.add_scalar(f"epoch/{key}", value, step)
            for key, value in _numbers(rec.get("val") or {}):
                self.writer.add_scalar(f"val/{key}", value, step)
            self.writer.flush()  # an epoch's curves are on disk when its line is

    def first_batch(self, batch, step: int = 0) -> None:
        """A grid of the batch's first images, each titled with its labels (per-frame runs:
        temporal batches hold feature windows, not images)."""
        images = getattr(batch, "images", None)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            return
        try:
            self.writer.add_figure("first_batch", _grid_figure(batch), step)
        except Exception as exc:  # a picture must never stop a run
            log.warning("TensorBoard: first batch grid not drawn: %s", exc)

    def close(self) -> None:
        self.writer.close()


def _grid_figure(batch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from affpipe.labels import AU_NAMES, EXPR_CLASSES

    n = min(GRID_IMAGES, len(batch))
    images = batch.images[:n].detach().float().cpu()
    if batch.images.dtype != torch.uint8:  # normalized floats: stretch each image back to [0, 1]
        lo = images.amin(dim=(1, 2, 3), keepdim=True)
        images = (images - lo) / (images.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-6)
    else:
        images = images / 255.0
    cols = 4
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 2.6), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(images[k].permute(1, 2, 0).numpy())
        lines = [f"row {int(batch.row_id[k])}"]
        if bool(batch.va_mask[k]):
            lines.append(f"V {float(batch.va[k, 0]):+.2f} A {float(batch.va[k, 1]):+.2f}")
        if bool(batch.expr_mask[k]):
            lines.append(EXPR_CLASSES[int(batch.expr[k])])
        if bool(batch.au_mask[k].any()):
            on = [AU_NAMES[j] for j in range(len(AU_NAMES)) if bool(batch.au_mask[k, j]) and float(batch.au[k, j]) > 0.5]
            lines.append(",".join(on) or "no AU")
        ax.set_title("\n".join(lines), fontsize=6)
    fig.tight_layout()
    return fig
