"""``affpipe predict``: ABAW submission formats (per-video, single file, MTL) and gap filling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from affpipe.labels import AU_NAMES, EXPR_CLASSES
from affpipe.loaders import LoaderConfig
from affpipe.run.config import load_config

TORCH = LoaderConfig(backend="torch", num_workers=0)


def predict(run, shards, out, fmt, **kw):
    from affpipe.runs import PredictConfig
    from affpipe.runs import predict as run_predict

    return run_predict(PredictConfig(run=run, shards=shards, out=out, format=fmt, device="cpu", **kw))

TINY = {"epochs": 1, "image_size": 32, "batch_size": 16, "max_steps_per_epoch": 2, "max_val_steps": 3,
        "loader.num_workers": 0, "loader.backend": "torch", "device": "cpu", "log_every": 1}


@pytest.fixture(scope="module")
def mtl_ckpt(shard_dir, tmp_path_factory) -> Path:
    from affpipe.runs.train import train

    out = tmp_path_factory.mktemp("pred") / "mtl"
    return train(load_config(None, {**TINY, "task": "mtl", "shards": shard_dir, "out": out})) / "best.pt"


def _val_frames(shard_dir: Path) -> dict[str, tuple[int, int]]:
    """video → (largest frame number, frames with an image) of the val split."""
    import pyarrow.compute as pc

    from affpipe.index.build import load_index
    from affpipe.shards.format import manifest_index

    manifest = json.loads((shard_dir / "manifest.json").read_text())
    table, _ = load_index(manifest_index(shard_dir, manifest), table=manifest.get("table", "frames"))
    table = table.filter(pc.equal(table["split"], "val"))
    out = {}
    for video in set(table["video"].to_pylist()):
        t = table.filter(pc.equal(table["video"], video))
        out[video] = (max(t["frame"].to_pylist()), sum(t["has_image"].to_pylist()))
    return out


def test_fill_nearest():
    from affpipe.runs.submission import _fill_nearest

    known = np.array([2, 5, 9])
    idx = _fill_nearest(np.arange(1, 12), known)
    # frame:      1  2  3  4  5  6  7  8  9 10 11   (3.5 is a tie → the earlier frame)
    assert idx.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


def test_per_video_format(mtl_ckpt, shard_dir, tmp_path):
    summary = predict(mtl_ckpt, shard_dir, tmp_path / "pv", "abaw-per-video", loader=TORCH)
    frames = _val_frames(shard_dir)
    assert summary["videos"] == len(frames)
    for video, (last, _) in frames.items():
        va = (tmp_path / "pv" / "VA" / f"{video}.txt").read_text().splitlines()
        ex = (tmp_path / "pv" / "EXPR" / f"{video}.txt").read_text().splitlines()
        au = (tmp_path / "pv" / "AU" / f"{video}.txt").read_text().splitlines()
        assert va[0] == "valence,arousal" and ex[0] == ",".join(EXPR_CLASSES) and au[0] == ",".join(AU_NAMES)
        assert len(va) == len(ex) == len(au) == last + 1  # one line per frame 1..last
        vals = np.array([[float(x) for x in line.split(",")] for line in va[1:]])
        assert vals.shape == (last, 2) and np.abs(vals).max() <= 1.0
        assert all(0 <= int(line) < 8 for line in ex[1:])
        assert all(len(line.split(",")) == 12 and set(line.split(",")) <= {"0", "1"} for line in au[1:])


def test_single_and_mtl_formats(mtl_ckpt, shard_dir, tmp_path):
    frames = _val_frames(shard_dir)
    predict(mtl_ckpt, shard_dir, tmp_path / "single", "abaw-single", loader=TORCH)
    va = (tmp_path / "single" / "VA.txt").read_text().splitlines()
    au = (tmp_path / "single" / "AU.txt").read_text().splitlines()
    assert va[0] == "image_location,valence,arousal" and au[0] == "image_location," + ",".join(AU_NAMES)
    assert len(va) == 1 + sum(last for last, _ in frames.values())
    name, v, a = va[1].split(",")
    assert name.split("/")[0] in frames and name.endswith("/00001.jpg") and -1 <= float(v) <= 1

    predict(mtl_ckpt, shard_dir, tmp_path / "mtl", "mtl", loader=TORCH)
    rows = (tmp_path / "mtl" / "MTL.txt").read_text().splitlines()
    assert rows[0] == "image,valence,arousal,expression,aus"
    assert len(rows) == 1 + sum(n for _, n in frames.values())  # one row per image
    fields = rows[1].split(",")
    assert len(fields) == 16 and fields[0].endswith(".jpg") and 0 <= int(fields[3]) < 8
    assert set(fields[4:]) <= {"0", "1"}


def test_mtl_format_needs_all_heads(shard_dir, tmp_path):
    from affpipe.runs.train import train
    run = train(load_config(None, {**TINY, "task": "va", "max_steps_per_epoch": 1, "shards": shard_dir,
                                   "out": tmp_path / "va"}))
    with pytest.raises(ValueError, match="multi-task"):
        predict(run, shard_dir, tmp_path / "x", "mtl", loader=TORCH)
    predict(run, shard_dir, tmp_path / "va_pred", "abaw-per-video", loader=TORCH)
    written = sorted(p.name for p in (tmp_path / "va_pred").iterdir() if not p.name.startswith(".affpipe"))
    assert written == ["VA", "probabilities"]  # the official folder, and the probabilities beside it
    assert [p.name for p in (tmp_path / "va_pred" / "probabilities").iterdir()] == ["VA.csv"]
