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

import logging
from pathlib import Path
from typing import Any

from affpipe.run.folder import RunFolder, eval_stem

log = logging.getLogger(__name__)

TUNE_FOLDS = 2


def features_dir(runs_dir: Path, source_run: str) -> Path:
    """Where the grid keeps the feature table of ``source_run``'s best.pt."""
    return Path(runs_dir).parent / "data" / "features" / source_run


def ensure_features(runs_dir: Path, source_run: str, shards: Path) -> Path:
    """Embed ``source_run``'s best.pt over every split of ``shards`` unless done (resumes a killed embed)."""
    from affpipe.loaders import LoaderConfig
    from affpipe.runs.embed import EmbedConfig, embed
    from affpipe.temporal.features import TABLE_FILE

    out = features_dir(runs_dir, source_run)
    if not (out / TABLE_FILE).is_file():
        log.info("experiments: embedding %s into %s", source_run, out)
        # In-process loader work without worker processes: forked DataLoader workers can hang
        # on the thread pools the data preparation left behind (see grid.train_run).
        embed(EmbedConfig(source=str(RunFolder(Path(runs_dir) / source_run).best), shards=Path(shards), out=out,
                          loader=LoaderConfig(num_workers=0), batch_size=128))
    return out


def evaluated(run_dir: Path) -> bool:
    """Whether ``run_dir``'s eval.json already holds intervals over the whole validation split
    and its predictions are kept (training writes both unless its validation was limited)."""
    files = RunFolder(run_dir)
    try:
        ev, limited = files.read_eval(), files.read_config().get("max_val_steps")
    except (OSError, ValueError):
        return False
    return "ci" in ev and not limited and files.predictions().is_file()


def evaluate_cell(run_dir: Path) -> dict[str, Any] | None:
    """``affpipe evaluate`` of a finished run's best.pt on validation (skipped when done; the run
    finds its own data through its lineage, whatever its kind)."""
    if evaluated(run_dir):
        return None
    from affpipe.loaders import LoaderConfig
    from affpipe.runs.evaluate import EvalConfig, evaluate

    log.info("experiments: evaluating %s (intervals, predictions)", Path(run_dir).name)
    return evaluate(EvalConfig(run=Path(run_dir), loader=LoaderConfig(num_workers=0)))


def smoothed_eval(run_dir: Path) -> dict[str, Any]:
    """Validation metrics of ``run_dir``'s best.pt with smoothing tuned on validation (cached),
    with intervals, and the score of smoothing cross-validated over videos
    (:func:`affpipe.runs.evaluate.smoothed_evaluation`)."""
    from affpipe.runs.evaluate import smoothed_evaluation
    from affpipe.runs.open import RunInputs, open_run

    files = RunFolder(run_dir)
    if files.has_eval(eval_stem(smoothed=True)):
        return files.read_eval(eval_stem(smoothed=True))
    evaluate_cell(run_dir)
    return smoothed_evaluation(open_run(RunInputs(run=Path(run_dir))), TUNE_FOLDS)
