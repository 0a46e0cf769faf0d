"""Evaluating and predicting, one path for every kind of run (per-frame, smoothed, temporal).

``open_run`` opens a run once (its checkpoint, config, kind, thresholds, smoothing and data, each
overridable); ``evaluate(EvalConfig)`` and ``predict(PredictConfig)`` take a frozen config
whatever the run's kind; ``submission`` is the one writer of prediction files. This stage sits
between ``temporal`` and ``experiments``: it serves both per-frame and temporal runs.
"""

from affpipe.runs.evaluate import EvalConfig, evaluate
from affpipe.runs.open import Run, RunInputs, open_run
from affpipe.runs.predict import PredictConfig, predict

__all__ = ["EvalConfig", "PredictConfig", "Run", "RunInputs", "evaluate", "open_run", "predict"]
