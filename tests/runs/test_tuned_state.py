"""Issue 24: tuned state (``au_thresholds.json``, ``smoothing.json``) applies only to the checkpoint
it was tuned on. Another checkpoint of the run (``last.pt``), or the same name holding another step,
is refused naming both, unless ``--tuned-from`` names the checkpoint it was tuned on; ``predict``
applying tuned thresholds says so in a WARNING line and its summary records where they came from."""

from __future__ import annotations

import json
import logging

import pytest

from affpipe.loaders import LoaderConfig

TORCH = LoaderConfig(backend="torch", num_workers=0)


def _evaluate(run, **kw):
    from affpipe.runs import EvalConfig, evaluate

    return evaluate(EvalConfig(run=run, device="cpu", loader=TORCH, **kw))


def _predict(run, out, **kw):
    from affpipe.runs import PredictConfig, predict

    return predict(PredictConfig(run=run, out=out, device="cpu", loader=TORCH, **kw))


def test_thresholds_tuned_on_best_pt_are_not_applied_to_last_pt_silently(copy_world, caplog):
    run = copy_world / "runs" / "frame"
    _evaluate(run / "best.pt", tune_au_thresholds=True)
    record = json.loads((run / "au_thresholds.json").read_text())
    assert record["checkpoint"] == "best.pt" and isinstance(record["step"], int)
    with pytest.raises(ValueError, match=r"au_thresholds.json was tuned on best.pt .*not on last.pt.*--tuned-from best.pt"):
        _predict(run / "last.pt", copy_world / "pred_last")
    assert not (copy_world / "pred_last").exists()  # refused before anything was written
    with caplog.at_level(logging.INFO):
        summary = _predict(run / "last.pt", copy_world / "pred_last", tuned_from="best.pt")
    from affpipe.labels import AU_NAMES

    assert "best.pt" in summary["au_thresholds_source"]
    assert summary["au_thresholds"] == [record["au_thresholds"][a] for a in AU_NAMES]
    loud = [r for r in caplog.records if r.levelno == logging.WARNING and "tuned AU thresholds" in r.getMessage()]
    assert loud, [r.getMessage() for r in caplog.records]
    caplog.clear()
    with caplog.at_level(logging.INFO):  # on the checkpoint they were tuned on: applied, and said loudly
        summary = _predict(run / "best.pt", copy_world / "pred_best")
    assert summary["au_thresholds_source"].startswith("au_thresholds.json (tuned on best.pt")
    assert any(r.levelno == logging.WARNING and "tuned AU thresholds" in r.getMessage() for r in caplog.records)


def test_smoothing_tuned_on_one_checkpoint_or_step_is_refused_on_another(copy_world):
    run = copy_world / "runs" / "frame"
    _evaluate(run, tune_smoothing=True, write=True)  # the run folder opens as best.pt
    saved = json.loads((run / "smoothing.json").read_text())
    assert saved["checkpoint"] == "best.pt" and isinstance(saved["step"], int)
    with pytest.raises(ValueError, match=r"smoothing.json was tuned on best.pt .*not on last.pt"):
        _evaluate(run / "last.pt", smooth=True, write=False)
    assert "smoothing" in _evaluate(run / "last.pt", smooth=True, write=False, tuned_from="best.pt")
    (run / "smoothing.json").write_text(json.dumps({**saved, "step": 999}))  # best.pt has moved on since
    with pytest.raises(ValueError, match=r"tuned on best.pt \(step 999, split val\), not on best.pt"):
        _evaluate(run, smooth=True, write=False)
