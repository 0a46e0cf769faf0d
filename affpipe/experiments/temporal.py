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
    """Whether ``run_dir``'s eval.json already holds intervals over the whole validation split
    and its predictions are kept (training writes both unless its validation was limited)."""
    try:
        ev = json.loads((Path(run_dir) / "eval.json").read_text())
        limited = json.loads((Path(run_dir) / "config.json").read_text()).get("max_val_steps")
    except (OSError, ValueError):
        return False
    return "ci" in ev and not limited and (Path(run_dir) / PREDICTIONS).is_file()


def _inputs(run_dir: Path, shards: Path):
    from affpipe.runs.open import RunInputs

    temporal = bool(json.loads((Path(run_dir) / "config.json").read_text()).get("features"))
    return RunInputs(run=Path(run_dir), shards=None if temporal else Path(shards))


def evaluate_cell(run_dir: Path, shards: Path) -> dict[str, Any] | None:
    """``affpipe evaluate`` of a finished run's best.pt on validation (skipped when done)."""
    if evaluated(run_dir):
        return None
    from dataclasses import asdict

    from affpipe.loaders import LoaderConfig
    from affpipe.runs.evaluate import EvalConfig, evaluate

    log.info("experiments: evaluating %s (intervals, predictions)", Path(run_dir).name)
    return evaluate(EvalConfig(**asdict(_inputs(run_dir, shards)), loader=LoaderConfig(num_workers=0)))


def smoothed_eval(run_dir: Path, shards: Path) -> dict[str, Any]:
    """Validation metrics of ``run_dir``'s best.pt with smoothing tuned on validation (cached),
    with intervals, and the score of smoothing cross-validated over videos. Redone from the
    predictions ``evaluate_cell`` kept: no second pass of the model."""
    from affpipe.runs.evaluate import Collected, apply_smoothing, run_folder_for_writing
    from affpipe.runs.open import open_run
    from affpipe.temporal.smoothing import tune_cross_validated
    from affpipe.scoring.bootstrap import evaluation_intervals, load_predictions
    from affpipe.train.evaluate import report_evaluation, write_eval
    from affpipe.scoring.metrics import MetricAccumulator

    path = Path(run_dir) / f"{SMOOTHED_STEM}.json"
    if path.is_file():
        return json.loads(path.read_text())
    evaluate_cell(run_dir, shards)
    run = open_run(_inputs(run_dir, shards))
    arrays, _ = load_predictions(run.folder / PREDICTIONS)
    acc = MetricAccumulator.from_state(run.cfg.heads, arrays)
    video, frame = run.frames_of(arrays["row_id"])
    c = Collected(acc, len(arrays["row_id"]), video, frame, {})
    with run_folder_for_writing(run.folder):
        cv = tune_cross_validated(c.acc, video, frame, TUNE_FOLDS)
        extra = apply_smoothing(run, c, "val", smooth=False, tune_smoothing=True, write=True)
        result = report_evaluation(c.acc, c.frames, run.cfg, run.ckpt, run.state, "val", write=False, extra=extra)
        result.update(evaluation_intervals(c.acc, video, run.folder, SMOOTHED_STEM))
        result["note"] = "smoothing windows tuned on this split (val): optimistic, as tuned AU thresholds are"
        keys = ("va_ccc", "valence_ccc", "arousal_ccc", "expr_f1", "au_f1", "p_mtl")
        result["cross_validated"] = {**{k: v for k, v in cv["scores"].items() if k in keys}, "folds": TUNE_FOLDS,
                                     "fold_windows": cv["fold_windows"],
                                     **evaluation_intervals(cv["acc"], video, run.folder, SMOOTHED_CV_STEM)}
        write_eval(run.folder, result, stem=SMOOTHED_STEM)
    return result
