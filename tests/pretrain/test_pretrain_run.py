"""The pre-training kind (issue 26 items 4, 5, 7): a run through the registry and the one loop,
its probe, resume after a kill, lineage, the backbone it hands to ``train --init`` and ``embed``,
and the hostile cases, one line each. Tiny: 32 px, batch 8, two steps an epoch, a narrow SimSiam."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from affpipe.pretrain.recipe import SimSiamConfig, default_recipe, run_config
from affpipe.run.checkpoint import load_checkpoint, read_metrics
from affpipe.run.config import load_config
from affpipe.run.data import lineage_of_run
from affpipe.runs.kinds import kind_named, kind_of
from affpipe.runs.train import train
from affpipe.train import loop


def _cfg(shards, out, *, method="simsiam", **kw):
    rec = default_recipe(method)
    views = tuple(dataclasses.replace(v, size=32) for v in rec.views)
    rec = dataclasses.replace(rec, arch="resnet18" if method == "simsiam" else rec.arch, image_size=32, epochs=2,
                              batch_size=8, views=views, simsiam=SimSiamConfig(proj_dim=32, pred_dim=8))
    run = dict(shards=shards, out=out, device="cpu", max_steps_per_epoch=2, ckpt_every=1, log_every=1,
               max_val_steps=2, probe_frames=32, probe_k=5, loader={"num_workers": 0, "backend": "torch"})
    run.update(kw)
    return run_config(rec, **run)


def _losses(run):
    keep = lambda r: {k: v for k, v in r.items()  # noqa: E731
                      if k.startswith(("loss", "cos", "z_std", "train_", "val", "step", "epoch", "lr")) and "time" not in k}
    return [keep(r) for r in read_metrics(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def whole(shard_dir, tmp_path_factory):
    writes = []
    real = loop.save_checkpoint
    loop.save_checkpoint = lambda path, state: writes.append(path.name) or real(path, state)
    try:
        run = train(_cfg(shard_dir, tmp_path_factory.mktemp("ssl") / "run"))
    finally:
        loop.save_checkpoint = real
    return run, writes


def test_a_pretrain_run_goes_through_the_registry_and_records_its_data(whole, shard_dir):
    run, _ = whole
    cfg = load_config(run / "config.json")
    assert kind_of(cfg) is kind_named("pretrain") and cfg.data.method == "simsiam"
    lin = lineage_of_run(run)
    assert lin["kind"] == "pretrain" and lin["splits"] == ["train"] and not lin["transductive"]
    assert len(lin["pretrain_fingerprint"]) == 16 and lin["frames"]["train"]["labelled"] > 0
    epochs = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all("p_mtl" in r["val"] and r["val"]["collapsed"] in (True, False) for r in epochs)
    result = json.loads((run / "eval.json").read_text())
    assert "p_mtl" in result and "ci" in result  # the probe's score, with intervals by video
    assert (run / "best.pt").is_file() and (run / "curves.png").is_file()


def test_killed_at_a_checkpoint_resumes_to_the_same_losses(whole, shard_dir, tmp_path, monkeypatch):
    ref, writes = whole
    real = loop.save_checkpoint
    n = 1  # killed while writing the second checkpoint: the first (step 1, mid-epoch) is on disk
    calls = []

    def dying(path, state):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(path.name)
        real(path, state)

    monkeypatch.setattr(loop, "save_checkpoint", dying)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(shard_dir, tmp_path / "run"))
    monkeypatch.setattr(loop, "save_checkpoint", real)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step_in_epoch"] == 1
    run = train(_cfg(shard_dir, tmp_path / "run", resume=True))
    assert _losses(run) == _losses(ref)


def test_its_backbone_initializes_a_per_frame_run_and_embeds(whole, shard_dir, tmp_path):
    from support import TINY_RUN

    run, _ = whole
    frame = train(load_config(None, {**TINY_RUN, "shards": shard_dir, "out": tmp_path / "f", "model.init": str(run),
                                     "model.arch": "resnet18"}))  # the SSL run's backbone
    init = next(r for r in read_metrics(frame / "metrics.jsonl") if r["kind"] == "init")
    assert init["loaded"] > 0 and json.loads((frame / "config.json").read_text())["model"]["init"].endswith("best.pt")
    state = load_checkpoint(run / "best.pt")
    enc = kind_named("pretrain").frame_encoder(load_config(run / "config.json"), state, "x")
    assert torch.equal(enc.backbone.conv1.weight, state["model"]["backbone.conv1.weight"])


# ---- hostile cases, one line each ---------------------------------------------------------------


def test_shards_without_unlabelled_frames_run_and_say_so(index_dir, tmp_path, caplog):
    from affpipe.shards.write import ShardConfig, write_shards

    shards = tmp_path / "s"
    write_shards(ShardConfig(index=index_dir, out=shards, split="all", samples_per_shard=100, workers=1, unlabelled=False))
    with caplog.at_level(logging.WARNING):
        run = train(dataclasses.replace(_cfg(shards, tmp_path / "run"), epochs=1))
    assert "hold no unlabelled frames" in caplog.text and lineage_of_run(run)["unlabelled_note"]


def test_a_collapsed_representation_is_reported_and_never_best(whole, shard_dir, tmp_path, caplog):
    from affpipe import dist
    from affpipe.pretrain.kind import PRETRAIN

    cfg = _cfg(shard_dir, tmp_path / "run")
    setup = PRETRAIN.setup(cfg, dist.setup("cpu"), tmp_path)
    with torch.no_grad():
        for p in setup.trainer.raw_model.backbone.parameters():
            p.zero_()
    with caplog.at_level(logging.WARNING):
        result = setup.trainer.validation(setup.loaders()[1])
    assert result.metrics["collapsed"] and not result.candidate and "collapsed" in caplog.text


def test_a_nan_loss_stops_with_one_line(shard_dir, tmp_path, monkeypatch):
    from affpipe.pretrain.methods import SimSiam

    real = SimSiam.loss
    monkeypatch.setattr(SimSiam, "loss", lambda self, views: {k: v * float("nan") for k, v in real(self, views).items()})
    with pytest.raises(loop.TrainingDiverged, match="not finite") as exc:
        train(_cfg(shard_dir, tmp_path / "run"))
    assert "\n" not in str(exc.value)


def test_mae_on_a_cnn_is_refused(shard_dir, tmp_path):
    cfg = _cfg(shard_dir, tmp_path / "run", method="mae")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="resnet18"))
    with pytest.raises(ValueError, match="needs a ViT backbone"):
        train(cfg)


def test_a_pretrain_run_given_to_another_architecture_is_refused(whole, shard_dir, tmp_path):
    from support import TINY_RUN

    with pytest.raises(ValueError, match="another architecture|no backbone weights"):
        train(load_config(None, {**TINY_RUN, "shards": shard_dir, "out": tmp_path / "f", "model.init": str(whole[0]),
                                 "model.arch": "mobilenet_v3_small"}))


def test_splits_val_without_force_val_is_refused(shard_dir, tmp_path):
    from click.testing import CliRunner

    from affpipe.cli import main

    res = CliRunner().invoke(main, ["pretrain", "--shards", str(shard_dir), "-o", str(tmp_path / "r"), "--splits",
                                    "train,val", "--device", "cpu"])
    assert res.exit_code != 0 and "--force-val" in res.output and "Traceback" not in res.output


def test_torchrun_two_process_gloo(shard_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "affpipe.cli",
           "pretrain", "--shards", str(shard_dir), "-o", str(out), "--image-size", "32", "--batch-size", "8",
           "--epochs", "1", "--max-steps-per-epoch", "2", "--device", "cpu", "--num-workers", "1",
           "--probe-frames", "32", "--max-val-steps", "2", "--log-every", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"] == [1, 2]  # rank 0 alone
    assert (out / "best.pt").is_file() and lineage_of_run(out)["kind"] == "pretrain"


def test_label_fraction_trains_on_a_seeded_share_of_the_videos_and_records_it(shard_dir, tmp_path):
    from support import TINY_RUN

    run = train(load_config(None, {**TINY_RUN, "shards": shard_dir, "out": tmp_path / "f", "label_fraction": 0.5}))
    lin = lineage_of_run(run)
    assert lin["label_fraction"] == 0.5 and 0 < lin["label_videos"] < lin["label_videos_of"]
    assert json.loads((run / "config.json").read_text())["label_fraction"] == 0.5
    assert load_config(run / "config.json").data.label_fraction == 0.5
    with pytest.raises(ValueError, match="label_fraction"):
        load_config(None, {**TINY_RUN, "shards": shard_dir, "label_fraction": 0.0})


TINY_RECIPE = """
method = "simsiam"
arch = "resnet18"
image_size = 32
epochs = 2
batch_size = 8
seed = 0
[optim]
optimizer = "sgd"
blr = 0.05
weight_decay = 1e-4
momentum = 0.9
[simsiam]
proj_dim = 32
pred_dim = 8
[[views]]
size = 32
[[views]]
size = 32
"""


def test_kill9_mid_epoch_then_resume_gives_the_same_losses(shard_dir, tmp_path):
    """A real `kill -9` of `affpipe pretrain` once a mid-epoch last.pt is on disk; `--resume`
    ends with the losses, probe scores and step count of a run never interrupted."""
    import subprocess
    import sys
    from pathlib import Path

    from support import kill9_at_checkpoint

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)

    def cli(out: Path, *extra: str) -> list[str]:
        return [str(Path(sys.executable).parent / "python"), "-m", "affpipe.cli", "pretrain", "--config", str(recipe),
                "--shards", str(shard_dir), "-o", str(out), "--device", "cpu", "--max-steps-per-epoch", "4",
                "--ckpt-every", "1", "--num-workers", "0", "--probe-frames", "16", "--max-val-steps", "2",
                "--log-every", "1", "--no-tensorboard", *extra]

    ref = tmp_path / "ref"
    done = subprocess.run(cli(ref), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "killed"
    kill9_at_checkpoint(cli(out), out, lambda st: st["epoch"] == 0 and 1 <= st["step_in_epoch"] < 4)
    killed_at = load_checkpoint(out / "last.pt")
    assert killed_at["epoch"] == 0 and 0 < killed_at["step_in_epoch"] < 4
    done = subprocess.run(cli(out, "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"] == list(range(1, 9))
    assert _losses(out) == _losses(ref)
    final = load_checkpoint(out / "last.pt")
    assert (final["epoch"], final["step"]) == (2, 8)
