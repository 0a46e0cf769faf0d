"""``affpipe evaluate``: metrics of a checkpoint, AU threshold tuning, eval.json / eval.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from affpipe.labels import AU_NAMES, EXPR_CLASSES
from affpipe.loaders import LoaderConfig
from affpipe.run.config import load_config

TORCH = LoaderConfig(backend="torch", num_workers=0)

TINY = {"task": "mtl", "epochs": 1, "image_size": 32, "batch_size": 16, "max_steps_per_epoch": 3,
        "max_val_steps": 3, "loader.num_workers": 0, "loader.backend": "torch", "device": "cpu", "log_every": 1}


@pytest.fixture(scope="module")
def run(shard_dir, tmp_path_factory) -> Path:
    from affpipe.runs.train import train

    return train(load_config(None, {**TINY, "shards": shard_dir, "out": tmp_path_factory.mktemp("ev") / "mtl"}))


def test_evaluate_matches_training_and_tunes_thresholds(run, shard_dir):
    from affpipe.runs import EvalConfig, evaluate

    trained = json.loads((run / "eval.json").read_text())
    # Same weights, same deterministic val batches as the trainer's last validation pass.
    same = evaluate(EvalConfig(run=run, shards=shard_dir, max_steps=3, write=False, loader=TORCH))
    for key in ("va_ccc", "expr_f1", "au_f1", "p_mtl"):
        assert same[key] == pytest.approx(trained[key], abs=1e-5), key

    result = evaluate(EvalConfig(run=run, shards=shard_dir, tune_au_thresholds=True, loader=TORCH))
    assert {"va_ccc", "valence_ccc", "arousal_ccc", "expr_f1", "au_f1", "p_mtl"} <= set(result)
    assert set(result["expr_f1_per_class"]) == set(EXPR_CLASSES)
    assert set(result["au_f1_per_au"]) == set(AU_NAMES)
    assert len(result["au_thresholds"]) == 12
    assert result["tuned"]["au_f1"] >= result["au_f1"] - 1e-9  # 0.5 is on the tuning grid
    stored = json.loads((run / "au_thresholds.json").read_text())["au_thresholds"]
    assert [stored[a] for a in AU_NAMES] == result["au_thresholds"]
    saved = json.loads((run / "eval.json").read_text())
    assert saved["frames"] == result["frames"] > 0 and "tuned" in saved
    md = (run / "eval.md").read_text()
    for heading in ("## CCC per dimension", "## F1 per emotion", "## F1 per AU", "| Fear |", "| AU26 |", "F1 (tuned)"):
        assert heading in md, heading


def test_evaluate_cli(run, shard_dir):
    from affpipe.cli import main

    res = CliRunner().invoke(main, ["evaluate", str(run / "best.pt"), "--shards", str(shard_dir), "--backend", "torch"])
    assert res.exit_code == 0, res.output
    assert "P_MTL" in res.output and "| Valence |" in res.output


def test_eval_markdown_uni_task():
    from affpipe.train.evaluate import eval_markdown

    md = eval_markdown({"task": "va", "split": "val", "va_ccc": 0.5, "valence_ccc": 0.6, "arousal_ccc": 0.4,
                        "frames": 10, "checkpoint": "best.pt", "step": 3})
    assert "| Valence | 0.6000 |" in md and "F1 per" not in md
