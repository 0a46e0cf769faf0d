"""``affpipe embed`` owns its folder (issue 17 items 1-3) and resumes after a kill to the same
table bytes, whichever part write the kill interrupted; it says which loader it used."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

from affpipe.io import sha256_file
from affpipe.loaders import LoaderConfig
from affpipe.models.model import ModelConfig, build_model
from affpipe.run.checkpoint import save_checkpoint
from affpipe.run.config import TrainConfig, to_dict
from affpipe.runs import embed as embed_mod
from affpipe.runs.embed import EmbedConfig, embed
from affpipe.temporal import features as features_mod


def _ckpt(path, seed: int):
    cfg = TrainConfig.of(task="mtl", image_size=32)
    torch.manual_seed(seed)
    save_checkpoint(path, {"model": build_model(ModelConfig()).state_dict(), "config": to_dict(cfg), "epoch": 1, "step": 1})
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    (base / "run1").mkdir()
    (base / "run2").mkdir()
    return _ckpt(base / "run1" / "best.pt", 0), _ckpt(base / "run2" / "best.pt", 1)


def _cfg(source, shards, out, **kw) -> EmbedConfig:
    return EmbedConfig(source=str(source), shards=shards, out=out, split="train", batch_size=64, device="cpu",
                       loader=LoaderConfig(backend="torch", num_workers=0), **kw)


@pytest.fixture(scope="module")
def whole(runs, shard_dir, tmp_path_factory):
    """An uninterrupted table of run1 (train split)."""
    out = tmp_path_factory.mktemp("whole") / "f"
    embed(_cfg(runs[0], shard_dir, out))
    return out


def _killed_at(monkeypatch, n: int) -> None:
    """Make the ``n``-th part write die like a kill: no cleanup of what was written before."""
    real, calls = embed_mod.write_part, []

    def dying(path, row_id, feats):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(path)
        return real(path, row_id, feats)

    monkeypatch.setattr(embed_mod, "write_part", dying)


def test_a_folder_holding_a_users_file_is_refused_and_nothing_deleted(runs, shard_dir, tmp_path):
    out = tmp_path / "F"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "thesis.txt").write_text("x")
    with pytest.raises(FileExistsError, match="thesis.txt"):
        embed(_cfg(runs[0], shard_dir, out))
    assert (out / "parts" / "thesis.txt").read_text() == "x"
    assert sorted(p.name for p in out.rglob("*")) == ["parts", "thesis.txt"]


def test_parts_as_a_symlink_is_refused_and_nothing_is_written_outside(runs, shard_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "F"
    out.mkdir()
    (out / "parts").symlink_to(elsewhere)
    with pytest.raises(FileExistsError, match="symlink"):
        embed(_cfg(runs[0], shard_dir, out))
    assert list(elsewhere.iterdir()) == []


def test_a_killed_table_is_never_finished_from_another_source(runs, shard_dir, whole, tmp_path, monkeypatch):
    out = tmp_path / "F"
    with monkeypatch.context() as m:
        _killed_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            embed(_cfg(runs[0], shard_dir, out))
    with pytest.raises(FileExistsError, match=r"run1.*run2|source_sha256") as exc:
        embed(_cfg(runs[1], shard_dir, out))
    assert "run1" in str(exc.value) and "run2" in str(exc.value) and "--overwrite" in str(exc.value)
    m2 = embed(_cfg(runs[1], shard_dir, out, overwrite=True))  # afresh: every part from run2
    assert m2["source"] == str(runs[1])
    ref = tmp_path / "ref2"
    embed(_cfg(runs[1], shard_dir, ref))
    assert sha256_file(out / "features.arrow") == sha256_file(ref / "features.arrow")
    assert sha256_file(out / "features.arrow") != sha256_file(whole / "features.arrow")


def _parts(shard_dir) -> int:
    return len(json.loads((shard_dir / "manifest.json").read_text())["splits"]["train"]["shards"])


@pytest.mark.parametrize("n", [0, 1, 2])
def test_resumed_after_a_kill_at_each_part_write_gives_the_same_bytes(n, runs, shard_dir, whole, tmp_path, monkeypatch):
    assert n < _parts(shard_dir)
    out = tmp_path / "F"
    with monkeypatch.context() as m:
        _killed_at(m, n)
        with pytest.raises(KeyboardInterrupt):
            embed(_cfg(runs[0], shard_dir, out))
    assert len(list((out / "parts").glob("*.arrow"))) == n
    embed(_cfg(runs[0], shard_dir, out))
    assert sha256_file(out / "features.arrow") == sha256_file(whole / "features.arrow")
    assert sorted(os.listdir(out)) == [".affpipe.json", ".affpipe.lock", "features.arrow", "manifest.json"]


def test_killed_during_the_merge_resumes_to_the_same_bytes(runs, shard_dir, whole, tmp_path, monkeypatch):
    out = tmp_path / "F"
    with monkeypatch.context() as m:
        m.setattr(features_mod, "write_table", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            embed(_cfg(runs[0], shard_dir, out))
    assert not (out / "manifest.json").exists()
    manifest = embed(_cfg(runs[0], shard_dir, out))
    assert manifest["loader"]["backend"] == "none (every shard was already embedded)"
    assert sha256_file(out / "features.arrow") == sha256_file(whole / "features.arrow")
    again = embed(_cfg(runs[0], shard_dir, out))  # complete: nothing to do, same manifest
    assert again == manifest


def test_embed_says_which_loader_it_used(whole, caplog, runs, shard_dir, tmp_path):
    m = json.loads((whole / "manifest.json").read_text())
    assert m["loader"] == {"backend": "torch", "num_workers": 0}
    with caplog.at_level(logging.INFO, logger="affpipe.runs.embed"):
        embed(_cfg(runs[0], shard_dir, tmp_path / "F"))
    assert "loader backend torch" in caplog.text
    assert len(m["shards_fingerprint"]) == 16 and len(m["index_fingerprint"]) == 16 and len(m["fingerprint"]) == 16


def test_kill_9_then_another_source_is_refused_and_the_same_source_resumes(runs, shard_dir, whole, tmp_path):
    """The real thing: `affpipe embed RUN1` killed with SIGKILL once a part is written."""
    import re
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "F"

    def cli(source, *extra):
        return [sys.executable, "-m", "affpipe.cli", "embed", str(source), "--shards", str(shard_dir), "-o", str(out),
                "--split", "train", "--batch-size", "64", "--device", "cpu", "--backend", "torch",
                "--num-workers", "0", *extra]

    proc = subprocess.Popen(cli(runs[0]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((out / "parts").glob("*.arrow")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    other = subprocess.run(cli(runs[1]), capture_output=True, text=True)
    errors = [line for line in re.split(r"[\r\n]", other.stderr + other.stdout) if "Error:" in line]
    assert other.returncode == 1 and len(errors) == 1 and "Traceback" not in other.stderr, other.stderr[-2000:]
    assert "run1" in errors[0] and "run2" in errors[0]
    again = subprocess.run(cli(runs[0]), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sha256_file(out / "features.arrow") == sha256_file(whole / "features.arrow")


# ---- issue 24: names from weight files, the skip path, NaN output, a failed merge ----------


def test_a_weight_file_whose_stem_is_dotdot_never_names_a_folder(tmp_path):
    from pathlib import Path

    cfg = EmbedConfig(source="weights", shards=tmp_path, out=tmp_path / "F", backbone=("resnet18", "resnet18"),
                      weights=(Path("/w/...pt"), Path("/w/b.pt")))  # stem ".."
    with pytest.raises(ValueError, match=r"--weights /w/\.\.\.pt: name '\.\.' is empty or a relative folder"):
        cfg.folders()
    cfg = EmbedConfig(source="weights", shards=tmp_path, out=tmp_path / "F", backbone=("resnet18", "resnet18"),
                      weights=(Path("/w/a\nb.pt"), Path("/w/b.pt")))
    with pytest.raises(ValueError, match="control character"):
        cfg.folders()


def test_a_temporal_head_on_a_table_embedded_with_weights_starts_its_skip_path_fresh(shard_dir, tmp_path):
    from affpipe.temporal.features import open_features, source_checkpoint
    from affpipe.temporal.kind import build_model_for

    weights = tmp_path / "backbone.pt"
    torch.save(build_model(ModelConfig()).backbone.state_dict(), weights)
    out = tmp_path / "F"
    manifest = embed(_cfg("weights", shard_dir, out, weights=(weights,), image_size=32))
    assert manifest["source_kind"] == "weights" and source_checkpoint(out, manifest) is None
    table = open_features(out)
    cfg = TrainConfig.of(task="mtl", features=out, image_size=32)
    model = build_model_for(cfg, table.dim, table)  # was: "backbone.pt: not an affpipe checkpoint"
    assert model is not None


def test_a_table_from_a_run_still_starts_its_skip_path_from_its_heads(whole, runs):
    from affpipe.temporal.features import read_manifest, source_checkpoint

    assert source_checkpoint(whole, read_manifest(whole)).resolve() == runs[0].resolve()


def _parts_of(tmp_path, feats):
    from affpipe.temporal.features import write_part

    (tmp_path / "parts").mkdir()
    n = len(feats)
    part = write_part(tmp_path / "parts" / "train-000000.arrow", np.arange(n), feats)
    lookup = lambda rid: (np.array(["v"] * len(rid), object), np.asarray(rid, np.int32) + 1,  # noqa: E731
                          np.array(["train"] * len(rid), object))
    return [part], lookup


def test_an_all_nan_table_is_refused_before_it_is_written(tmp_path):
    from affpipe.temporal.features import SCRATCH_FILE, TABLE_FILE, merge_parts

    parts, lookup = _parts_of(tmp_path, np.full((6, 4), np.nan, np.float16))
    with pytest.raises(ValueError, match=r"6 of 6 rows of features are NaN or infinite \(first: video v frame 1"):
        merge_parts(parts, tmp_path, lookup)
    assert not (tmp_path / TABLE_FILE).exists() and not (tmp_path / SCRATCH_FILE).exists()


def test_a_merge_on_a_full_disk_leaves_no_scratch_and_names_the_file(tmp_path, monkeypatch):
    import errno

    from affpipe.temporal.features import SCRATCH_FILE, TABLE_FILE, merge_parts

    parts, lookup = _parts_of(tmp_path, np.ones((6, 4), np.float16))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(features_mod, "write_table", full)
    with pytest.raises(OSError, match="No space left"):
        merge_parts(parts, tmp_path, lookup)
    assert not (tmp_path / SCRATCH_FILE).exists() and not (tmp_path / TABLE_FILE).exists()


def test_a_merge_on_a_full_disk_fails_at_the_reservation_naming_the_scratch(tmp_path, monkeypatch):
    import errno
    import os

    from affpipe.temporal.features import SCRATCH_FILE, TABLE_FILE, merge_parts

    parts, lookup = _parts_of(tmp_path, np.ones((6, 4), np.float16))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=rf"^{tmp_path / SCRATCH_FILE}: disk full"):
        merge_parts(parts, tmp_path, lookup)
    assert not (tmp_path / SCRATCH_FILE).exists() and not (tmp_path / TABLE_FILE).exists()


def test_embed_with_nan_weights_is_refused_at_the_first_part_and_writes_no_table(shard_dir, tmp_path):
    backbone = build_model(ModelConfig()).backbone.state_dict()
    backbone = {k: torch.full_like(v, float("nan")) if k.endswith("conv1.weight") else v for k, v in backbone.items()}
    torch.save(backbone, tmp_path / "nan.pt")
    out = tmp_path / "F"
    with pytest.raises(ValueError, match=r"parts/train-000000\.arrow: \d+ of \d+ frames embedded by .*nan\.pt are NaN"):
        embed(_cfg("weights", shard_dir, out, weights=(tmp_path / "nan.pt",), image_size=32))
    assert not (out / "features.arrow").exists() and not list(out.rglob("*.arrow"))
