"""TensorBoard event files (--tensorboard): read back with tensorboard's own reader, they hold
the same scalars as metrics.jsonl, step for step; a first-batch image grid; temporal runs too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from affpipe.run.checkpoint import read_metrics

pytest.importorskip("tensorboard")

FLAGS = ["--image-size", "32", "--batch-size", "16", "--max-steps-per-epoch", "3", "--max-val-steps", "3",
         "--num-workers", "0", "--backend", "torch", "--device", "cpu", "--log-every", "1", "--epochs", "2"]


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _scalars(acc) -> dict[str, dict[int, float]]:
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _expected(records) -> dict[str, dict[int, float]]:
    want: dict[str, dict[int, float]] = {}
    skip = ("epoch", "step", "step_in_epoch", "steps_in_epoch")
    for rec in records:
        kind = rec["kind"]
        if kind not in ("train", "epoch"):
            continue
        rows = [(k, v) for k, v in rec.items() if k not in skip and isinstance(v, int | float) and not isinstance(v, bool)]
        rows = [(f"{kind}/{k}", v) for k, v in rows]
        rows += [(f"val/{k}", v) for k, v in (rec.get("val") or {}).items() if isinstance(v, int | float)]
        rows += [(f"val/{group}/{k}", v) for group, per in (rec.get("val_per") or {}).items()
                 for k, v in per.items() if isinstance(v, int | float)]
        for tag, value in rows:
            want.setdefault(tag, {})[rec["step"]] = float(value)
    return want


def _assert_same(run: Path) -> dict[str, dict[int, float]]:
    got = {tag: v for tag, v in _scalars(_events(run)).items() if not tag.startswith("hparams/")}  # at run end
    want = _expected(read_metrics(run / "metrics.jsonl"))
    assert set(got) == set(want)
    for tag, series in want.items():
        assert sorted(got[tag]) == sorted(series), tag  # the same steps
        for step, value in series.items():
            assert got[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)
    return got


def test_tensorboard_scalars_match_metrics_jsonl_step_for_step(shard_dir, tmp_path):
    run = tmp_path / "mtl"
    res = subprocess.run([sys.executable, "-m", "affpipe.cli", "train", "--task", "mtl", "--shards", str(shard_dir),
                          "-o", str(run), "--task-weighting", "uncertainty", "--tensorboard", *FLAGS],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    assert list(run.glob("events.out.tfevents.*"))
    got = _assert_same(run)
    for tag in ("train/loss", "train/loss_va", "train/loss_expr", "train/loss_au", "train/lr", "train/frames_per_s",
                "train/data_wait_share", "train/weight_va", "val/va_ccc", "val/expr_f1", "val/au_f1", "val/p_mtl"):
        assert tag in got, tag
    assert sorted(got["train/loss"]) == [1, 2, 3, 4, 5, 6] and sorted(got["val/p_mtl"]) == [3, 6]
    images = _events(run).Tags()["images"]
    assert images == ["first_batch"]


def test_recipe_key_and_resume_keep_one_value_per_step(shard_dir, tmp_path):
    """[logging] tensorboard = true; what a killed process logged past last.pt is purged on resume."""
    from torch.utils.tensorboard import SummaryWriter

    from affpipe.run.config import load_config
    from affpipe.runs.train import train

    recipe = tmp_path / "r.toml"
    recipe.write_text('task = "va"\n[logging]\ntensorboard = true\n')
    over = {"shards": shard_dir, "out": tmp_path / "run", "image_size": 32, "batch_size": 16, "epochs": 1,
            "max_steps_per_epoch": 3, "max_val_steps": 3, "loader.num_workers": 0, "loader.backend": "torch",
            "device": "cpu", "log_every": 1}
    cfg = load_config(recipe, over)
    assert cfg.logging.tensorboard
    run = train(cfg)
    # a process killed after last.pt (step 3) had logged steps 4-5 with other values
    ghost = SummaryWriter(log_dir=str(run))
    for step in (4, 5):
        ghost.add_scalar("train/loss", 1e6, step)
    ghost.close()
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "epoch": 1, "step": 4, "loss": 1000000.0}\n')
    train(load_config(recipe, {**over, "epochs": 2, "resume": True}))
    got = _assert_same(run)
    assert sorted(got["train/loss"]) == [1, 2, 3, 4, 5, 6] and max(got["train/loss"].values()) < 1e6


def test_temporal_run_writes_the_same_events(shard_dir, tmp_path):
    from affpipe.loaders import LoaderConfig
    from affpipe.models.model import ModelConfig, build_model
    from affpipe.run.checkpoint import save_checkpoint
    from affpipe.run.config import TrainConfig, load_config, to_dict
    from affpipe.runs.embed import EmbedConfig, embed
    from affpipe.runs.train import train as train_any

    ckpt = tmp_path / "frame.pt"
    save_checkpoint(ckpt, {"model": build_model(ModelConfig(arch="resnet18")).state_dict(),
                           "config": to_dict(TrainConfig.of(task="mtl", image_size=32)), "epoch": 1, "step": 1})
    embed(EmbedConfig(source=str(ckpt), shards=shard_dir, out=tmp_path / "feats", split="all", batch_size=64,
                      device="cpu", loader=LoaderConfig(backend="torch", num_workers=0)))
    cfg = load_config(None, {"task": "mtl", "features": tmp_path / "feats", "out": tmp_path / "tmp", "epochs": 1,
                             "batch_size": 4, "temporal.window": 8, "temporal.stride": 8, "device": "cpu",
                             "log_every": 1, "max_steps_per_epoch": 3, "logging.tensorboard": True})
    run = train_any(cfg)
    got = _assert_same(run)
    assert "train/loss" in got and "val/p_mtl" in got
    assert "images" not in _events(run).Tags() or not _events(run).Tags()["images"]  # no frames to draw
