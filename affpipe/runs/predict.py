"""``affpipe predict``: one function for every kind of run, writing ABAW submission files.

``predict(PredictConfig)`` opens the run once, checks the templates against the format and the
model before any work, claims the output folder for ``predict`` (``affpipe.outdir``: a folder
holding a user's files is refused; a rerun with other inputs is refused unless ``overwrite``,
which deletes only predict's own files), runs the model (``affpipe.runs.evaluate.collect``:
non-finite outputs stop it with one error), optionally smooths per video, and writes the files
through the one writer, ``affpipe.runs.submission.write_submission``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from affpipe.labels import AU_NAMES, EDITIONS
from affpipe.loaders.base import LoaderConfig
from affpipe.runs.evaluate import apply_smoothing, collect
from affpipe.runs.open import RunInputs, open_run
from affpipe.runs.submission import (
    FORMATS,
    PREDICT_OWNER,
    PROBABILITIES,
    check_templates,
    index_predictions,
    write_probabilities,
    write_submission,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PredictConfig(RunInputs):
    """What ``predict`` writes (``RunInputs``: the run and its data overrides)."""

    out: Path
    format: str = "abaw-per-video"  # one of FORMATS
    split: str = "val"
    templates: tuple[Path, ...] = ()  # official test-set files the output follows row for row
    fill_missing: bool = False  # template rows of videos not in the split get the default
    edition: str = "abaw3"  # headers written without a template (abaw1 | abaw2 | abaw3)
    smooth: bool = False  # the windows of the run's smoothing.json
    au_thresholds: tuple[float, ...] | None = None  # None: the run's au_thresholds.json, else 0.5
    batch_size: int | None = None
    device: str = "auto"
    loader: LoaderConfig | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.edition not in EDITIONS:
            raise ValueError(f"edition must be one of {EDITIONS}, got {self.edition!r}")


def predict(cfg: PredictConfig) -> dict[str, Any]:
    """Run ``cfg.run`` over ``cfg.split`` and write its submission files under ``cfg.out``.

    Returns a summary: files written, videos, template rows, rows filled from a neighbouring
    frame or given the default, columns without a model output, samples skipped.
    """
    from affpipe.io import sha256_file
    from affpipe.outdir import claim

    run = open_run(cfg)
    heads = run.cfg.heads
    if cfg.format == "mtl" and set(heads) != {"va", "expr", "au"}:
        raise ValueError(f"--format mtl needs a multi-task model; {run.ckpt} has heads {list(heads)}")
    check_templates(cfg.templates, cfg.format, heads)  # a wrong template stops here, before any work
    thresholds, source = _thresholds(run, cfg)
    rows = run.split_rows(cfg.split)
    inputs = {"checkpoint": str(run.ckpt.resolve()), "checkpoint_sha256": sha256_file(run.ckpt),
              "data": [str(Path(p).resolve()) for p in run.data.inputs],
              "split": cfg.split, "format": cfg.format, "edition": cfg.edition, "smooth": cfg.smooth,
              "templates": [str(Path(t).resolve()) for t in cfg.templates], "fill_missing": cfg.fill_missing,
              "au_thresholds": thresholds}
    with claim(cfg.out, PREDICT_OWNER, inputs, overwrite=cfg.overwrite) as out:
        c = collect(run, cfg.split, device=cfg.device, batch_size=cfg.batch_size, loader=cfg.loader)
        smoothing = apply_smoothing(run, c, cfg.split, smooth=cfg.smooth, tune_smoothing=False, write=False)
        pred = c.acc.predictions(au_thresholds=thresholds)
        p = index_predictions(pred, heads, rows[1], rows[2], _positions(rows[0], pred["row_id"]), rows[3])
        summary = write_submission(p, out, cfg.format, templates=tuple(cfg.templates), fill_missing=cfg.fill_missing,
                                   edition=cfg.edition)
        summary["probabilities"] = [str(f) for f in write_probabilities(p, out)]
    summary.update(split=cfg.split, checkpoint=str(run.ckpt), au_thresholds=thresholds, au_thresholds_source=source,
                   videos=len(p.last),
                   predicted_frames=int(len(pred["row_id"])), skipped=c.skipped, **smoothing)
    log.info("wrote %d file(s) under %s (%d rows, %d filled from a neighbouring frame)", len(summary["files"]),
             cfg.out, summary["lines"], summary["filled_from_neighbour"])
    return summary


def _thresholds(run, cfg: PredictConfig) -> tuple[list[float] | None, str]:
    """The AU thresholds predict applies and where they come from: ``--au-thresholds``, the run's
    ``au_thresholds.json`` (only when tuned on this checkpoint, or ``--tuned-from``; said loudly,
    since they change every AU column), or none (0.5)."""
    if cfg.au_thresholds is not None:
        return list(cfg.au_thresholds), "given"
    thresholds = run.au_thresholds()
    if thresholds is None:
        return None, "0.5"
    record = run.files.read_thresholds() or {}
    where = f"{run.files.thresholds.name} (tuned on {record.get('checkpoint')}, split {record.get('split')})"
    log.warning("predict: AU labels use thresholds other than 0.5: the tuned AU thresholds of %s, on %s's AU "
                "predictions: %s (the probabilities are in the output's %s/)", where, run.ckpt.name,
                ", ".join(f"{n} {t:.2f}" for n, t in zip(AU_NAMES, thresholds, strict=True)), PROBABILITIES)
    return thresholds, where


def _positions(row_id: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Position in the predictions of each of ``row_id`` (-1: not predicted)."""
    n = int(max(row_id.max(initial=-1), predicted.max(initial=-1))) + 1
    where = np.full(n, -1, np.int64)
    where[predicted] = np.arange(len(predicted))
    return where[row_id]
