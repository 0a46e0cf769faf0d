"""``affpipe embed`` on the tiny session shards, then a temporal head trained on its features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from affpipe.loaders import LoaderConfig
from affpipe.models.model import ModelConfig, build_model
from affpipe.run.checkpoint import save_checkpoint
from affpipe.run.config import TemporalConfig, TrainConfig, to_dict
from affpipe.runs import embed as embed_mod
from affpipe.runs.embed import EmbedConfig, embed
from affpipe.temporal.features import read_table


@pytest.fixture(scope="module")
def frame_ckpt(tmp_path_factory):
    """A per-frame multi-task checkpoint (random weights) at 32 px."""
    path = tmp_path_factory.mktemp("run") / "best.pt"
    cfg = TrainConfig.of(task="mtl", image_size=32)
    torch.manual_seed(0)
    save_checkpoint(path, {"model": build_model(ModelConfig()).state_dict(), "config": to_dict(cfg), "epoch": 1, "step": 1})
    return path


@pytest.fixture(scope="module")
def feats(frame_ckpt, shard_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("feats")
    embed(EmbedConfig(source=str(frame_ckpt), shards=shard_dir, out=out, batch_size=64, device="cpu",
                      loader=LoaderConfig(backend="torch", num_workers=0)))
    return out


def test_embed_writes_a_sorted_table_with_its_manifest(feats, shard_dir, frame_ckpt):
    t = read_table(feats)
    m = json.loads((feats / "manifest.json").read_text())
    shards = json.loads((shard_dir / "manifest.json").read_text())
    assert len(t) == sum(s["samples"] for s in shards["splits"].values()) == m["rows"]
    assert t.dim == m["feature_dim"] == 512 and m["backbone"] == "resnet18" and m["image_size"] == 32
    assert (feats / m["source_checkpoint"]).resolve() == frame_ckpt.resolve() and len(m["source_sha256"]) == 64
    assert not m["source_checkpoint"].startswith("/") and (feats / m["index"] / "index.json").is_file()
    assert (np.diff(t.video.astype(np.int64) * 10**6 + t.frame) > 0).all()
    assert m["throughput"]["frames_per_s"] > 0 and 0 <= m["throughput"]["data_wait_share"] <= 1
    assert not (feats / "parts").exists()


def test_embed_resumes_per_shard_after_a_kill(frame_ckpt, shard_dir, feats, tmp_path, monkeypatch):
    real, written = embed_mod.write_part, []

    def dying(path, row_id, features):
        if len(written) == 2:
            raise KeyboardInterrupt  # killed after two shards
        written.append(path.name)
        return real(path, row_id, features)

    cfg = EmbedConfig(source=str(frame_ckpt), shards=shard_dir, out=tmp_path / "f", split="val", batch_size=64,
                      device="cpu", loader=LoaderConfig(backend="torch", num_workers=0))
    monkeypatch.setattr(embed_mod, "write_part", dying)
    with pytest.raises(KeyboardInterrupt):
        embed(cfg)
    assert sorted(p.name for p in (tmp_path / "f" / "parts").glob("*.arrow")) == sorted(written)
    again: list[str] = []
    monkeypatch.setattr(embed_mod, "write_part", lambda p, r, f: again.append(p.name) or real(p, r, f))
    embed(cfg)
    assert not set(again) & set(written)  # the finished shards were not embedded again
    full, part = read_table(feats), read_table(tmp_path / "f")
    val = full.rows_of("val")
    np.testing.assert_array_equal(part.row_id, full.row_id[val])
    np.testing.assert_allclose(part.features.astype(np.float32), full.features[val].astype(np.float32), atol=1e-2)


def test_embed_imagenet_offline_names_the_cache_file(shard_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(RuntimeError, match="resnet18-f37072fd.pth"):
        embed(EmbedConfig(source="imagenet", shards=shard_dir, out=tmp_path / "f"))


def _temporal_cfg(feats, out, **kw):
    return TrainConfig.of(task="mtl", features=feats, out=out, epochs=2, batch_size=4, lr=1e-3, device="cpu",
                       log_every=2, temporal=TemporalConfig(window=8, stride=4, hidden=16, layers=2), **kw)


@pytest.mark.parametrize("arch", ["tcn", "transformer"])
def test_temporal_run_folder_like_a_per_frame_run(feats, tmp_path, arch):
    from dataclasses import replace

    from affpipe.runs.train import train as train_temporal

    cfg = _temporal_cfg(feats, tmp_path / "run")
    cfg = replace(cfg, data=replace(cfg.data, temporal=replace(cfg.data.temporal, arch=arch)))
    run = train_temporal(cfg)
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "eval.json", "eval.md", "curves.png"):
        assert (run / name).is_file(), name
    ev = json.loads((run / "eval.json").read_text())
    t = read_table(feats)
    assert ev["frames"] == len(t.rows_of("val")) and {"va_ccc", "expr_f1", "au_f1", "p_mtl"} <= set(ev)
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if e["kind"] == "epoch"] == [0, 1]
    resumed = train_temporal(replace(cfg, epochs=3, resume=True))  # continue the finished run one epoch
    epochs = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if e["kind"] == "epoch"] == [0, 1, 2]


def test_evaluate_predict_and_smoothing_on_a_temporal_run(feats, tmp_path):
    from affpipe.runs import EvalConfig, PredictConfig, RunInputs, evaluate, open_run, predict
    from affpipe.runs.train import train as train_temporal

    run = train_temporal(_temporal_cfg(feats, tmp_path / "run"))
    assert open_run(RunInputs(run=run)).kind.name == "temporal"
    plain = evaluate(EvalConfig(run=run, write=False))
    best = json.loads((run / "eval.json").read_text())
    for key in ("va_ccc", "expr_f1", "au_f1"):  # evaluate reproduces the trainer's validation pass
        assert plain[key] == pytest.approx(best[key], abs=1e-4)
    tuned = evaluate(EvalConfig(run=run, tune_smoothing=True))
    for key in ("va_ccc", "expr_f1", "au_f1"):
        assert tuned[key] >= plain[key] - 1e-9  # window 1 is a candidate: tuning never lowers a score
    assert (run / "smoothing.json").is_file() and set(tuned["smoothing"]["windows"]) == {"va", "expr", "au"}
    again = evaluate(EvalConfig(run=run, smooth=True, write=False))
    assert again["va_ccc"] == pytest.approx(tuned["va_ccc"])
    summary = predict(PredictConfig(run=run, out=tmp_path / "pred", format="abaw-single", smooth=True))
    lines = (tmp_path / "pred" / "VA.txt").read_text().splitlines()
    assert lines[0] == "image_location,valence,arousal" and len(lines) - 1 == summary["lines"] > 0
    assert summary["smoothing"]["windows"] == tuned["smoothing"]["windows"]


def test_cli_embed_and_smoothing_of_a_per_frame_run(frame_ckpt, shard_dir, tmp_path):
    from click.testing import CliRunner

    from affpipe.cli import main

    r = CliRunner().invoke(main, ["embed", str(frame_ckpt), "--shards", str(shard_dir), "-o", str(tmp_path / "f"),
                                  "--split", "val", "--backend", "torch", "--num-workers", "0", "--device", "cpu",
                                  "--batch-size", "64"])
    assert r.exit_code == 0, r.output
    assert "frames/s" in r.output and "data wait" in r.output
    r = CliRunner().invoke(main, ["evaluate", str(frame_ckpt), "--shards", str(shard_dir), "--tune-smoothing",
                                  "--backend", "torch", "--num-workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "Smoothing windows" in r.output and (frame_ckpt.parent / "smoothing.json").is_file()
    other = tmp_path / "other.pt"
    other.write_bytes(frame_ckpt.read_bytes())
    r = CliRunner().invoke(main, ["embed", str(other), "--shards", str(shard_dir), "-o", str(tmp_path / "f"),
                                  "--split", "val", "--device", "cpu"])
    assert r.exit_code == 1 and "from other inputs" in r.output and "other.pt" in r.output and "--overwrite" in r.output


def test_bench_embed_reports_forward_and_embed_speed(frame_ckpt, shard_dir, tmp_path):
    from affpipe.bench.temporal import bench_embed

    r = bench_embed(str(frame_ckpt), shard_dir, tmp_path / "f", batch_size=64, forward_seconds=0.5,
                    loader=LoaderConfig(backend="torch", num_workers=0))
    assert r["forward_only_frames_per_s"] > 0 and r["embed_frames_per_s"] > 0 and 0 <= r["data_wait_share"] <= 1
    assert r["frames"] == read_table(tmp_path / "f").row_id.size
