"""Issue 12, training: divergence stops the run (9), recipe values checked up front (15),
--on-bad/--index in the config (12, 13), predict never writes outside -o (2), moved data (13)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from affpipe.loaders import LoaderConfig
from affpipe.run.checkpoint import load_checkpoint
from affpipe.run.config import load_config

TORCH = LoaderConfig(backend="torch", num_workers=0)
TINY = {"task": "mtl", "epochs": 1, "image_size": 32, "batch_size": 16, "max_steps_per_epoch": 2,
        "max_val_steps": 3, "loader": {"num_workers": 0, "backend": "torch"}, "device": "cpu", "log_every": 1}


def test_nonfinite_loss_stops_the_run_naming_the_step(shard_dir, tmp_path):
    from affpipe.runs.train import train
    from affpipe.train.loop import TrainingDiverged

    run = tmp_path / "run"
    cfg = load_config(None, {**TINY, "shards": shard_dir, "out": run, "lr": 1e30, "ckpt_every": 1,
                             "max_steps_per_epoch": 4})
    with pytest.raises(TrainingDiverged, match=r"loss is not finite \((nan|inf)\) at step (\d+) \(epoch 1\)") as err:
        train(cfg)
    step = int(err.value.args[0].split(" at step ")[1].split()[0])
    assert not (run / "eval.json").exists()
    if (run / "last.pt").exists():  # the last good checkpoint, never the diverged state
        last = load_checkpoint(run / "last.pt")
        assert last["step"] < step
        assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("key, value, message", [
    ("lr", 0.0, "lr must be"), ("lr", -1e-3, "lr must be"), ("lr", math.nan, "lr must be"),
    ("weight_decay", -1.0, "weight_decay must be"), ("plateau_factor", 1.0, "plateau_factor must be"),
    ("device", "tpu", "device must be one of"), ("seed", -1, "seed must be"),
])
def test_recipe_values_are_checked_when_loaded(tmp_path, key, value, message):
    recipe = tmp_path / "r.toml"
    text = f'task = "va"\n{key} = {json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else "nan"}\n'
    recipe.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(recipe)


def test_on_bad_backend_and_index_may_change_on_resume():
    from affpipe.run.checkpoint import config_differences
    from affpipe.run.config import to_dict

    a = to_dict(load_config(None, {"task": "va"}))
    b = to_dict(load_config(None, {"task": "va", "loader.on_bad": "skip", "loader.backend": "torch", "index": "/x"}))
    assert config_differences(a, b) == []
    old = {k: v for k, v in a.items() if k != "index"}  # a checkpoint of an older version
    assert config_differences(old, a) == []


def _predict(run, shards, out, fmt, **kw):
    from affpipe.runs import PredictConfig, predict

    return predict(PredictConfig(run=run, shards=shards, out=out, format=fmt, device="cpu", **kw))


@pytest.fixture(scope="module")
def mtl_run(shard_dir, tmp_path_factory) -> Path:
    from affpipe.runs.train import train

    return train(load_config(None, {**TINY, "shards": shard_dir, "out": tmp_path_factory.mktemp("i12") / "mtl"}))


def test_predict_refuses_a_video_name_that_leaves_out(mtl_run, shard_dir, tmp_path):
    from affpipe.shards import manifest_index

    index = tmp_path / "crafted"
    shutil.copytree(manifest_index(shard_dir), index)
    tbl = pq.read_table(index / "frames.parquet")
    video = tbl["video"].to_pylist()
    val = next(v for v, s in zip(video, tbl["split"].to_pylist(), strict=True) if s == "val")
    evil = ["../../escaped" if v == val else v for v in video]
    pq.write_table(tbl.set_column(tbl.schema.get_field_index("video"), "video", pa.array(evil)), index / "frames.parquet")
    out = tmp_path / "sub" / "out"
    with pytest.raises(ValueError, match=r"name '\.\./\.\./escaped' contains a path separator"):
        _predict(mtl_run / "best.pt", shard_dir, out, "abaw-per-video", index=index, loader=TORCH)
    assert not (tmp_path / "escaped.txt").exists() and not list(tmp_path.rglob("escaped*"))
    assert not out.exists()


def test_train_and_predict_after_moving_shards_and_index(mtl_run, shard_dir, tmp_path):
    from affpipe.runs.train import train
    from affpipe.shards import ShardConfig, manifest_index, write_shards

    data = tmp_path / "data"
    shutil.copytree(manifest_index(shard_dir), data / "index")
    write_shards(ShardConfig(index=data / "index", out=data / "shards" / "s", samples_per_shard=100, workers=1))
    moved = tmp_path / "moved"
    shutil.move(data, moved)
    shards = moved / "shards" / "s"
    train(load_config(None, {**TINY, "shards": shards, "out": tmp_path / "run"}))
    summary = _predict(mtl_run / "best.pt", shards, tmp_path / "pred", "abaw-single", loader=TORCH)
    assert summary["videos"] > 0 and summary["skipped"] == {}
    # The run trained on the moved shards: with the index it recorded (and the shards' manifest
    # names) gone too, an index elsewhere is given with --index. (mtl_run's own recorded index
    # is still where it was, and is the same table: it needs no flag.)
    shutil.move(moved / "index", tmp_path / "idx-elsewhere")
    with pytest.raises(FileNotFoundError, match="--index"):
        _predict(tmp_path / "run" / "best.pt", shards, tmp_path / "pred2", "abaw-single", loader=TORCH)
    _predict(tmp_path / "run" / "best.pt", shards, tmp_path / "pred2", "abaw-single", loader=TORCH,
             index=tmp_path / "idx-elsewhere")


# ---- issue 24: a NaN task weight -------------------------------------------------------------


@pytest.mark.parametrize("weights", [(math.nan, 1.0, 1.0), (1.0, math.inf, 1.0)])
def test_a_nonfinite_task_weight_is_refused_before_training(weights):
    from affpipe.scoring.tasks import LossConfig

    with pytest.raises(ValueError, match=r"task_weights must be 3 finite non-negative floats"):
        LossConfig(task_weights=weights)


def test_a_loss_that_diverges_before_any_checkpoint_names_no_missing_file(tmp_path):
    from affpipe.train.loop import TrainingDiverged, check_finite

    class State:
        step, epoch = 1, 0

    with pytest.raises(TrainingDiverged, match="stopped before any checkpoint was written") as err:
        check_finite([0.0], 1, State(), math.nan, 1e-3, tmp_path)
    assert "last.pt" not in str(err.value)
