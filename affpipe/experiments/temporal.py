"""The grid's evaluations of finished cells: intervals and kept predictions, embedding, smoothing.

``evaluate_cell`` evaluates a finished run's best.pt once more with ``affpipe evaluate``, so its
``eval.json`` holds the 95% video-bootstrap intervals and ``eval_predictions.npz`` the per-frame
predictions the report's paired comparisons read. ``ensure_features`` writes
``<runs>/../data/features/<run>/`` from ``<runs>/<run>/best.pt`` once; ``smoothed_eval``
evaluates a finished run (per-frame or temporal) with smoothing windows tuned on validation and
keeps the result beside ``eval.json`` as ``eval_smoothed.json`` (plus ``smoothing.json``), with
the same windows scored by cross-validation over videos as ``cross_validated``, leaving the
trainer's own ``eval.json`` untouched.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SMOOTHED_STEM = "eval_smoothed"
SMOOTHED_CV_STEM = "eval_smoothed_cv"
PREDICTIONS = "eval_predictions.npz"
TUNE_FOLDS = 2


def features_dir(runs_dir: Path, source_run: str) -> Path:
    """Where the grid keeps the feature table of ``source_run``'s best.pt."""
    return Path(runs_dir).parent / "data" / "features" / source_run


def ensure_features(runs_dir: Path, source_run: str, shards: Path) -> Path:
    """Embed ``source_run``'s best.pt over every split of ``shards`` unless done (resumes a killed embed)."""
    from affpipe.loaders import LoaderConfig
    from affpipe.temporal.embed import EmbedConfig, embed
    from affpipe.temporal.features import TABLE_FILE

    out = features_dir(runs_dir, source_run)
    if not (out / TABLE_FILE).is_file():
        log.info("experiments: embedding %s into %s", source_run, out)
        # In-process loader work without worker processes: forked DataLoader workers can hang
        # on the thread pools the data preparation left behind (see grid.train_run).
        embed(EmbedConfig(source=str(Path(runs_dir) / source_run / "best.pt"), shards=Path(shards), out=out,
                          loader=LoaderConfig(num_workers=0), batch_size=128))
    return out


def evaluated(run_dir: Path) -> bool:
    """Whether ``run_dir``'s eval.json already holds intervals and its predictions are kept."""
    try:
        ev = json.loads((Path(run_dir) / "eval.json").read_text())
    except (OSError, ValueError):
        return False
    return "ci" in ev and (Path(run_dir) / PREDICTIONS).is_file()


def evaluate_cell(run_dir: Path, shards: Path) -> dict[str, Any] | None:
    """``affpipe evaluate`` of a finished run's best.pt on validation (skipped when done)."""
    if evaluated(run_dir):
        return None
    from affpipe.loaders import LoaderConfig
    from affpipe.temporal.evaluate import evaluate_run

    log.info("experiments: evaluating %s (intervals, predictions)", Path(run_dir).name)
    return evaluate_run(Path(run_dir), Path(shards), split="val", loader=LoaderConfig(num_workers=0))


def smoothed_eval(run_dir: Path, shards: Path) -> dict[str, Any]:
    """Validation metrics of ``run_dir``'s best.pt with smoothing tuned on validation (cached),
    with intervals, and the cross-validated score of smoothing tuned on other videos."""
    from affpipe.loaders import LoaderConfig
    from affpipe.temporal.evaluate import apply_smoothing, collect, frames_of
    from affpipe.temporal.smoothing import tune_cross_validated
    from affpipe.train.bootstrap import evaluation_intervals
    from affpipe.train.evaluate import report_evaluation, write_eval

    path = Path(run_dir) / f"{SMOOTHED_STEM}.json"
    if path.is_file():
        return json.loads(path.read_text())
    c = collect(Path(run_dir), Path(shards), "val", loader=LoaderConfig(num_workers=0))
    video, frame = frames_of(c.acc, c.label_table)
    cv = tune_cross_validated(c.acc, video, frame, TUNE_FOLDS)
    extra = apply_smoothing(c, "val", smooth=False, tune_smoothing=True, write=True)
    result = report_evaluation(c.acc, c.frames, c.cfg, c.ckpt, c.state, "val", write=False, extra=extra)
    result.update(evaluation_intervals(c.acc, video, run_dir, SMOOTHED_STEM))
    result["note"] = "smoothing windows tuned on this split (val): optimistic, as tuned AU thresholds are"
    scores = {k: v for k, v in cv["scores"].items() if k in ("va_ccc", "valence_ccc", "arousal_ccc", "expr_f1",
                                                                 "au_f1", "p_mtl")}
    result["cross_validated"] = {**scores, "folds": TUNE_FOLDS, "fold_windows": cv["fold_windows"],
                                 **evaluation_intervals(cv["acc"], video, run_dir, SMOOTHED_CV_STEM)}
    write_eval(Path(run_dir), result, stem=SMOOTHED_STEM)
    return result
