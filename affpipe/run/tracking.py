"""TensorBoard event files written from the records of ``metrics.jsonl`` (the source of truth).

``TensorBoardSink(run).record(rec)`` is called with every record ``RunLog.write`` appends, so the
event files hold exactly what the log holds, at the same steps: ``train/<key>`` for each number of
a ``train`` record (total and per-task loss, learned task weights, lr, frames/s, data-wait
share), ``epoch/<key>`` for an ``epoch`` record's numbers and ``val/<metric>`` for its
validation metrics, ``val/<metric>/<class or AU>`` for its per-class and per-AU F1
(``val_per``). When the run ends, ``hparams`` (the resolved ``config.json``, flattened, against the
last validation's scores) go into the same event file; ``record_evaluation`` adds an
``evaluate``'s results (``<eval stem>/<metric>``) to a run folder that has TensorBoard on.
Nothing is read from the device: records are host numbers already, so no
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
        self.run = Path(run)
        self.writer = writer(log_dir=str(run), purge_step=purge_step, flush_secs=30)
        self.last_val: dict[str, float] = {}
        self.step = 0
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
                self.last_val[key], self.step = value, step
            for group, values in (rec.get("val_per") or {}).items():
                for name, value in _numbers(values if isinstance(values, Mapping) else {}):
                    self.writer.add_scalar(f"val/{group}/{name}", value, step)
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

    def hparams(self) -> None:
        """The resolved config (``config.json``, flattened) against the last validation's scores,
        written into this event file (``SummaryWriter.add_hparams`` would open a sub-folder)."""
        from affpipe.run.folder import RunFolder

        files = RunFolder(self.run)
        if not self.last_val or not files.has_config():
            return
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"hparams/{k}": v for k, v in self.last_val.items()}
        exp, ssi, sei = hparams(hparam_values(files.read_config()), metrics)
        fw = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, self.step)

    def close(self) -> None:
        try:
            self.hparams()
        except Exception as exc:  # a summary must never stop a run
            log.warning("TensorBoard: hparams not written: %s", exc)
        self.writer.close()


def hparam_values(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config flattened to dotted keys, each value a number, a bool or a string (what the
    hparams plugin takes)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(hparam_values(value, f"{prefix}{key}."))
        elif isinstance(value, bool | int | float | str):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def record_evaluation(run: Path, stem: str, result: Mapping[str, Any]) -> None:
    """An evaluation's scores as ``<stem>/<metric>`` (per class / AU: ``<stem>/<metric>/<name>``)
    at the evaluated checkpoint's step, in a new event file of the run folder."""
    from affpipe._optional import import_summary_writer

    writer = import_summary_writer()(log_dir=str(run))
    step = int(result.get("step", 0) or 0)
    try:
        for key, value in _numbers(result):
            if key not in ("frames", "videos"):
                writer.add_scalar(f"{stem}/{key}", value, step)
        for key, values in result.items():
            if key.endswith(("_per_class", "_per_au")) and isinstance(values, Mapping):
                for name, value in _numbers(values):
                    writer.add_scalar(f"{stem}/{key}/{name}", value, step)
    finally:
        writer.close()
    log.info("TensorBoard: %s's results added to %s", stem, run)


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
