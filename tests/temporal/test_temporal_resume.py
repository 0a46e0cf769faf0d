"""Temporal runs resume at any checkpoint, mid-epoch included (issue 17 item 5), and record
what they trained on (``lineage.json`` and every checkpoint's ``state["lineage"]``)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from affpipe.bench.temporal import make_random_table
from affpipe.run.checkpoint import load_checkpoint, read_metrics
from affpipe.run.config import TemporalConfig, TrainConfig
from affpipe.run.data import lineage_of_run
from affpipe.runs.train import train as train_temporal
from affpipe.train import loop


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    return make_random_table(tmp_path_factory.mktemp("t"), rows=800, videos=6, dim=16)


def _cfg(feats, out, **kw) -> TrainConfig:
    return TrainConfig.of(task="mtl", features=feats, out=out, epochs=2, batch_size=4, device="cpu", lr=1e-3,
                       ckpt_every=2, log_every=1, max_steps_per_epoch=4, seed=0,
                       temporal=TemporalConfig(window=8, stride=4, hidden=16, layers=2), **kw)


def _losses(run):
    """Every step's logged loss parts, and every epoch's train means and validation scores."""
    keep = lambda r: {k: v for k, v in r.items()  # noqa: E731
                      if k.startswith(("loss", "train_", "val", "step", "epoch", "lr")) and "time" not in k}
    return [keep(r) for r in read_metrics(run / "metrics.jsonl")]


def _eval(run):
    return {k: v for k, v in json.loads((run / "eval.json").read_text()).items() if "time" not in k}


class Killed(BaseException):
    pass


@pytest.fixture(scope="module")
def whole(feats, tmp_path_factory):
    """An uninterrupted run, and how many checkpoint writes it made."""
    writes = []
    real = loop.save_checkpoint
    loop.save_checkpoint = lambda path, state: writes.append(path.name) or real(path, state)
    try:
        run = train_temporal(_cfg(feats, tmp_path_factory.mktemp("whole") / "run"))
    finally:
        loop.save_checkpoint = real
    return run, writes


def test_an_uninterrupted_run_checkpoints_mid_epoch(whole):
    run, writes = whole
    assert writes.count("last.pt") == 4  # step 2 of each epoch (mid-epoch), and each epoch's end


def test_killed_at_every_checkpoint_write_resumes_to_the_same_losses_and_eval(whole, feats, tmp_path, monkeypatch):
    ref, writes = whole
    real = loop.save_checkpoint
    for n in range(1, len(writes)):  # killed while writing checkpoint n: checkpoint n-1 is on disk
        out = tmp_path / f"run{n}"
        calls = []

        def dying(path, state, calls=calls, n=n):
            if len(calls) == n:
                raise Killed
            calls.append(path.name)
            real(path, state)

        monkeypatch.setattr(loop, "save_checkpoint", dying)
        with pytest.raises(Killed):
            train_temporal(_cfg(feats, out))
        monkeypatch.setattr(loop, "save_checkpoint", real)
        # The first write can be the start candidate's best.pt (before any last.pt): then the
        # resumed run starts from scratch.
        last = out / "last.pt"
        step_in_epoch = load_checkpoint(last)["step_in_epoch"] if last.is_file() else None
        run = train_temporal(_cfg(feats, out, resume=True))
        assert _losses(run) == _losses(ref), f"killed at checkpoint write {n} (step_in_epoch {step_in_epoch})"
        assert _eval(run) == _eval(ref), n


def test_a_temporal_run_records_what_it_trained_on(whole, feats):
    run, _ = whole
    lin = lineage_of_run(run)
    assert lin["kind"] == "temporal" and lin["shards"] is None and len(lin["features"]) == 1
    assert (run / lin["features"][0]).resolve() == feats.resolve() and not lin["features"][0].startswith("/")
    assert (run / lin["index"] / "index.json").is_file() and len(lin["index_fingerprint"]) == 16
    assert load_checkpoint(run / "last.pt")["lineage"] == lin == load_checkpoint(run / "best.pt")["lineage"]


def test_resuming_on_other_data_is_refused_naming_both(whole, feats, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(whole[0], run)
    lin = json.loads((run / "lineage.json").read_text())
    lin["features_fingerprint"] = ["0" * 16]
    (run / "lineage.json").write_text(json.dumps(lin))
    with pytest.raises(ValueError, match="the feature tables") as exc:
        train_temporal(replace(_cfg(feats, run, resume=True), epochs=3))
    assert str(run) in str(exc.value) and "0000000000000000" in str(exc.value)
