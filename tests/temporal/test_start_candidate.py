"""A temporal run validates its initial state (the source run's heads through the skip path) before
the first step, and keeps it as best.pt when training only makes things worse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from affpipe.loaders import LoaderConfig
from affpipe.models.model import ModelConfig, build_model
from affpipe.run.checkpoint import load_checkpoint, read_metrics, save_checkpoint
from affpipe.run.config import TemporalConfig, TrainConfig, to_dict
from affpipe.runs.embed import EmbedConfig, embed


def _embed(ckpt, shard_dir, out):
    embed(EmbedConfig(source=str(ckpt), shards=shard_dir, out=out, batch_size=64, device="cpu",
                      loader=LoaderConfig(backend="torch", num_workers=0)))
    return out


@pytest.fixture(scope="module")
def feats(shard_dir, tmp_path_factory):
    """Frame features of a per-frame multi-task checkpoint whose heads fit the validation split
    (least squares on its features): the state a temporal run starts from is very good there."""
    from affpipe.temporal.data import TemporalData

    first = tmp_path_factory.mktemp("run") / "random.pt"
    torch.manual_seed(0)
    state = build_model(ModelConfig()).state_dict()
    config = to_dict(TrainConfig.of(task="mtl", image_size=32))
    save_checkpoint(first, {"model": state, "config": config, "epoch": 1, "step": 1})
    data = TemporalData.open(_embed(first, shard_dir, tmp_path_factory.mktemp("f0")))
    rows = data.table.rows_of("val")
    x = np.c_[data.table.features[rows].astype(np.float64), np.ones(len(rows))]
    lab = {k: v.numpy() for k, v in data.labels.take(rows, np.ones(len(rows), bool)).items()}
    targets = {"va": np.arctanh(np.clip(np.nan_to_num(lab["va"].astype(np.float64)), -0.95, 0.95)),
               "expr": 8.0 * np.eye(8)[np.clip(lab["expr"].astype(np.int64), 0, 7)] - 4.0,
               "au": 8.0 * (lab["au"] > 0.5) - 4.0}
    for task, y in targets.items():
        w = np.linalg.solve(x.T @ x + 1e-3 * np.eye(x.shape[1]), x.T @ y)  # [513, out]
        state[f"heads.{task}.weight"] = torch.tensor(w[:-1].T, dtype=torch.float32)
        state[f"heads.{task}.bias"] = torch.tensor(w[-1], dtype=torch.float32)
    fitted = first.parent / "best.pt"
    save_checkpoint(fitted, {"model": state, "config": config, "epoch": 1, "step": 1})
    return _embed(fitted, shard_dir, tmp_path_factory.mktemp("feats"))  # the same backbone: the same features


def _run(feats, out, lr: float, epochs: int = 2):
    from affpipe.runs.train import train as train_temporal

    cfg = TrainConfig.of(task="mtl", features=feats, out=out, epochs=epochs, batch_size=4, lr=lr, device="cpu",
                      optimizer="adamw", weight_decay=0.0, log_every=2,
                      temporal=TemporalConfig(window=8, stride=4, hidden=16, layers=2, dropout=0.0, input_dropout=0.0))
    return train_temporal(cfg)


def test_start_state_is_validated_and_kept_when_training_makes_it_worse(feats, tmp_path):
    run = _run(feats, tmp_path / "bad", lr=1.0)  # AdamW at lr 1: every step moves each weight by ~1
    records = read_metrics(run / "metrics.jsonl")
    start = [r for r in records if r["kind"] == "start"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(start) == 1 and start[0]["step"] == 0 and len(epochs) == 2
    assert start[0]["score"] > 2.0  # the fitted heads: P_MTL near its maximum of 3 on validation
    assert all(e["score"] < start[0]["score"] for e in epochs)  # training only made it worse
    best = load_checkpoint(run / "best.pt")
    assert best["step"] == 0  # the state the run started from
    ev = json.loads((run / "eval.json").read_text())
    assert ev["step"] == 0 and ev["p_mtl"] == pytest.approx(start[0]["score"])


def test_start_candidate_loses_to_a_better_epoch_and_does_not_step_the_scheduler(feats, tmp_path):
    run = _run(feats, tmp_path / "ok", lr=1e-2, epochs=1)
    records = read_metrics(run / "metrics.jsonl")
    start = next(r for r in records if r["kind"] == "start")
    epoch = next(r for r in records if r["kind"] == "epoch")
    best = load_checkpoint(run / "best.pt")
    assert best["step"] == (epoch["step"] if epoch["score"] > start["score"] else 0)
    assert epoch["lr"] == pytest.approx(1e-2)  # the start validation is no plateau step
