"""Training's own eval.json carries the 95% video intervals of the validation that chose best.pt,
and keeps that validation's predictions for paired comparisons."""

from __future__ import annotations

import json

import pytest

from affpipe.run.checkpoint import load_checkpoint
from affpipe.run.config import load_config
from affpipe.scoring import bootstrap as bs

TINY = {"batch_size": 8, "image_size": 32, "lr": 1e-3, "device": "cpu", "log_every": 2, "max_steps_per_epoch": 2,
        "loader.backend": "torch", "loader.num_workers": 0}


def test_training_eval_json_has_intervals_and_predictions(shard_dir, tmp_path):
    from affpipe.runs.train import train

    run = train(load_config(None, {"task": "mtl", "shards": shard_dir, "out": tmp_path / "r", "epochs": 1, **TINY}))
    ev = json.loads((run / "eval.json").read_text())
    assert ev["ci_method"]["unit"] == "recording" and ev["ci_method"]["videos"] >= 2
    for key in ("va_ccc", "valence_ccc", "arousal_ccc", "expr_f1", "au_f1", "p_mtl"):
        assert len(ev["ci"][key]) == 2, key
    # The kept predictions are the validation pass's: the same metrics and intervals recomputed.
    arrays, videos = bs.load_predictions(run / ev["predictions"])
    again = bs.bootstrap_result(arrays, videos)
    assert again["ci"] == ev["ci"]
    stats = bs.video_stats(arrays, videos)  # the twin's _left/_right subjects: one recording each pair
    assert len(stats.videos) == len(set(bs.recording_of(videos).tolist())) <= len(set(videos))
    point = bs.metrics_from_stats(stats, bs.point_and_resamples(len(stats.videos), 1)[:1])
    assert point["p_mtl"][0] == pytest.approx(ev["p_mtl"])
    assert "[" in (run / "eval.md").read_text().split("| P_MTL")[1].splitlines()[0]
    # best.pt's record holds them too (a resumed run writes the same intervals).
    assert load_checkpoint(run / "best.pt")["best_metrics"]["ci"] == ev["ci"]
