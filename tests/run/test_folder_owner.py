"""The run-kinds restructuring: one owner for the run folder, kinds picked in one place, the
config's kind in its type, each command reading ``frames.parquet`` once."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import TINY_RUN

from affpipe.run.config import (
    FeaturesData,
    ShardsData,
    TrainConfig,
    config_json,
    from_dict,
    load_config,
    to_dict,
)
from affpipe.run.folder import RUN_FILES, RUN_OWNER, RunFolder, resolve_checkpoint
from affpipe.runs.kinds import KINDS, kind_named, kind_of


def test_the_ownership_list_is_derived_from_the_run_files():
    assert RUN_OWNER.patterns == tuple(f.pattern for f in RUN_FILES)
    assert len({f.pattern for f in RUN_FILES}) == len(RUN_FILES)


def test_every_file_train_and_evaluate_write_is_a_run_file(copy_world):
    from affpipe.runs.evaluate import EvalConfig, evaluate

    run = copy_world / "runs" / "frame"
    evaluate(EvalConfig(run=run, tune_au_thresholds=True, tune_smoothing=True, device="cpu"))
    written = [p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()]
    assert written and all(RUN_OWNER.owns(rel) or rel.startswith(".affpipe") for rel in written), written
    files = RunFolder(run)
    assert files.read_config()["task"] == "mtl" and files.read_lineage_raw()["kind"] == "frames"
    assert files.read_eval()["split"] == "val" and files.read_thresholds()["checkpoint"] == "best.pt"
    assert resolve_checkpoint(run) == files.best


def test_a_config_says_its_kind_and_round_trips_as_0_3_wrote_it():
    frames = load_config(None, {"task": "va", "shards": "s"})
    temporal = TrainConfig.of(task="mtl", features=["a", "b"], temporal={"arch": "transformer"})
    assert isinstance(frames.data, ShardsData) and isinstance(temporal.data, FeaturesData)
    assert kind_of(frames).name == "frames" and kind_of(temporal).name == "temporal"
    old = to_dict(frames)  # 0.3's flat keys: shards, features (null), index, temporal (defaults)
    assert old["shards"] == "s" and old["features"] is None and old["temporal"]["arch"] == "tcn"
    assert from_dict(json.loads(config_json(frames))) == frames
    assert to_dict(temporal)["features"] == ["a", "b"] and from_dict(to_dict(temporal)) == temporal


@pytest.mark.parametrize("bad, why", [
    ({"shards": "s", "temporal.window": 8}, "temporal options apply to a temporal head"),
    ({"shards": "s", "features": "f"}, "reads no shards"),
    ({"features": ["f", "f"]}, "listed twice"),
])
def test_invalid_combinations_cannot_be_built(bad, why):
    with pytest.raises(ValueError, match=why):
        load_config(None, {"task": "mtl", **bad})
    with pytest.raises(ValueError, match="data must be"):
        TrainConfig(data={"shards": "s"})


def test_the_registry_names_every_kind_once():
    assert len({k.name for k in KINDS}) == len(KINDS) and kind_named("temporal") is KINDS[1]
    assert kind_named("pretrain") is KINDS[2]  # the third kind (issue 26)
    with pytest.raises(ValueError, match="unknown kind of run 'distill'"):
        kind_named("distill", "lineage.json")


def test_each_command_reads_frames_parquet_once(copy_world, monkeypatch):
    """Starting a training run, opening it for evaluate and embedding each read the label table once."""
    from affpipe.runs.open import RunInputs, open_run
    from affpipe.runs.train import train

    reads: list[str] = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda path, *a, **k: reads.append(Path(path).name) or real(path, *a, **k))
    train(load_config(None, {**TINY_RUN, "shards": copy_world / "shards", "out": copy_world / "runs" / "again",
                             "max_steps_per_epoch": 1}))
    assert reads.count("frames.parquet") == 1, reads
    reads.clear()
    open_run(RunInputs(run=copy_world / "runs" / "frame"))
    assert reads.count("frames.parquet") == 1, reads
    reads.clear()
    open_run(RunInputs(run=copy_world / "runs" / "temporal"))
    assert reads.count("frames.parquet") == 1, reads
