"""``affpipe predict --split test --template``: the output follows an official file row for row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from affpipe.labels import AU_NAMES
from affpipe.loaders import LoaderConfig
from affpipe.run.config import load_config

TORCH = LoaderConfig(backend="torch", num_workers=0)
TINY = {"epochs": 1, "image_size": 32, "batch_size": 16, "max_steps_per_epoch": 2, "max_val_steps": 3,
        "loader.num_workers": 0, "loader.backend": "torch", "device": "cpu", "log_every": 1}
TESTSET = "6th ABAW Annotations/TestSet"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    """An ABAW6 twin with 3 test videos and its test files, indexed, sharded (all), a tiny MTL run."""
    from affpipe.index.build import IndexConfig, build_index
    from affpipe.runs.train import train
    from affpipe.shards.write import ShardConfig, write_shards
    from affpipe.synth.generate import SynthConfig, generate

    base = tmp_path_factory.mktemp("release")
    generate(SynthConfig(out=base / "tree", layout="abaw6", videos=6, frames=40, seed=3, mtl=True, test_videos=3))
    build_index(IndexConfig(root=base / "tree", out=base / "index", workers=1))
    write_shards(ShardConfig(index=base / "index", out=base / "shards", split="all", samples_per_shard=80, workers=1))
    run = train(load_config(None, {**TINY, "task": "mtl", "shards": base / "shards", "out": base / "run"}))
    return {"base": base, "tree": base / "tree", "shards": base / "shards", "ckpt": run / "best.pt"}


def _predict(release, out, fmt, templates, **kw):
    from affpipe.runs import PredictConfig, predict

    return predict(PredictConfig(run=release["ckpt"], shards=release["shards"], out=out, format=fmt, split="test",
                                 loader=TORCH, device="cpu", templates=tuple(templates), **kw))


def _lines(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\n")[:-1]


def test_abaw6_examples_reproduced_row_for_row(release, tmp_path):
    specs = {"VA": ("VA.txt", 2), "Expr": ("EXPR.txt", 1), "AU": ("AU.txt", 12)}
    templates = [release["tree"] / TESTSET / f"CVPR_6th_ABAW_{name}_test_set_example.txt" for name in specs]
    summary = _predict(release, tmp_path, "abaw-single", templates)
    total = 0
    for template, (out, ncols) in zip(templates, specs.values(), strict=True):
        want, got = _lines(template), _lines(tmp_path / out)
        assert got[0] == want[0] and len(got) == len(want) > 1
        assert [g.split(",")[0] for g in got[1:]] == [w.split(",")[0] for w in want[1:]]  # rows and order
        assert all(len(g.split(",")) == 1 + ncols for g in got[1:])
        total += len(want) - 1
    assert summary["lines"] == total and summary["filled_missing"] == 0


def test_mtl_release_with_gaps_reproduced(release, tmp_path):
    template = release["tree"] / TESTSET / "MTL_Challenge_test_set_release.txt"
    _predict(release, tmp_path, "mtl", [template])
    want, got = _lines(template), _lines(tmp_path / "MTL.txt")
    assert got[0] == want[0] == "image,valence,arousal,expression,aus"
    assert [g.split(",")[0] for g in got[1:]] == want[1:]
    frames = [int(w.split("/")[1][:5]) for w in want[1:]]
    assert any(b - a > 1 for a, b in zip(frames, frames[1:], strict=False))  # the release has gaps
    assert all(len(g.split(",")) == 16 for g in got[1:])


def _test_videos(release) -> dict[str, list[int]]:
    import pyarrow.compute as pc

    from affpipe.index.build import load_index

    table, _ = load_index(release["base"] / "index")
    table = table.filter(pc.equal(table["split"], "test"))
    out: dict[str, list[int]] = {}
    for v, f in zip(table["video"].to_pylist(), table["frame"].to_pylist(), strict=True):
        out.setdefault(v, []).append(f)
    return out


@pytest.fixture(scope="module")
def fake(release):
    """Predictions for every test crop without running a model (the writers are pure functions)."""
    import pyarrow.compute as pc

    from affpipe.index.build import load_index
    from affpipe.runs.submission import index_predictions

    table, _ = load_index(release["base"] / "index")
    table = table.filter(pc.equal(table["split"], "test")).sort_by([("video", "ascending"), ("frame", "ascending")])
    video = np.array(table["video"].to_pylist(), dtype=object)
    frame = table["frame"].to_numpy().astype(np.int64)
    has = table["has_image"].to_numpy(zero_copy_only=False)
    pos = np.where(has, np.cumsum(has) - 1, -1)
    n = int(has.sum())
    rng = np.random.default_rng(0)
    prob = rng.dirichlet(np.ones(8), n).astype(np.float32)
    pred = {"row_id": np.arange(n), "va": rng.uniform(-1, 1, (n, 2)).astype(np.float32), "expr": prob.argmax(1),
            "expr_prob": prob, "au": (rng.random((n, 12)) < 0.3).astype(np.int8)}
    return index_predictions(pred, ("va", "expr", "au"), video, frame, pos, has)


def _write(fake, templates, out, fmt="abaw-single", **kw):
    from affpipe.outdir import claim
    from affpipe.runs.submission import PREDICT_OWNER, write_submission

    with claim(out, PREDICT_OWNER, {}) as folder:
        return write_submission(fake, folder, fmt, templates=tuple(templates), **kw)


def test_hand_made_sample_crlf_7_classes_gaps_and_past_the_end(release, fake, tmp_path):
    """An ABAW5-style file: CRLF, trailing comma, frames without a crop and past the last crop,
    a 7-class EXPR header: the output keeps all of it and fills from the nearest frame."""
    videos = _test_videos(release)
    v = sorted(videos)[0]
    last = max(videos[v])
    frames = [f for f in range(1, last + 3) if f not in videos[v][1:2]]  # drop one crop's row
    header = "image_location,Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,"  # a trailing comma too
    text = header + "\r\n" + "".join(f"{v}/{f:05d}.jpg,\r\n" for f in frames)
    template = tmp_path / "CVPR_5th_ABAW_Expr_test_set_sample.txt"
    template.write_bytes(text.encode())
    summary = _write(fake, [template], tmp_path / "o")
    raw = (tmp_path / "o" / "EXPR.txt").read_bytes().decode()
    assert raw.count("\r\n") == len(frames) + 1 and raw.startswith(header + "\r\n")
    rows = raw.split("\r\n")[1:-1]
    assert [r.split(",")[0] for r in rows] == [f"{v}/{f:05d}.jpg" for f in frames]
    assert all(0 <= int(r.split(",")[1]) <= 6 for r in rows)  # the 7 classes of the header
    assert summary["past_last_frame"] == 2 and summary["filled_from_neighbour"] >= 2


def test_abaw1_au_header_and_unknown_video(release, fake, tmp_path):
    videos = _test_videos(release)
    v = sorted(videos)[0]
    header = "image_location,AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25"
    template = tmp_path / "au_sample.txt"
    template.write_text(header + "\n" + f"{v}/00001.jpg,\nnot_a_test_video/00001.jpg,\n")
    with pytest.raises(ValueError, match=r"au_sample\.txt:3: video 'not_a_test_video' is not in the predicted split"):
        _write(fake, [template], tmp_path / "o")
    summary = _write(fake, [template], tmp_path / "o", fill_missing=True)
    rows = _lines(tmp_path / "o" / "AU.txt")
    assert rows[0] == header and rows[2] == "not_a_test_video/00001.jpg,0,0,0,0,0,0,0,0"
    assert rows[1].split(",")[7] == "0"  # AU20: no model output
    assert summary["filled_missing"] == 1 and summary["unpredicted_columns"] == ["AU20"]


def test_per_video_from_names_list(release, fake, tmp_path):
    names = release["tree"] / TESTSET / "names_of_videos_in_each_test_set" / "Valence_Arousal_Estimation_Challenge_test_set_release.txt"
    listed = names.read_text().split()
    _write(fake, [names], tmp_path, "abaw-per-video")
    written = sorted(p.stem for p in (tmp_path / "VA").glob("*.txt"))
    assert written == sorted(listed) and not (tmp_path / "EXPR").exists()
    videos = _test_videos(release)
    for v in listed:
        lines = _lines(tmp_path / "VA" / f"{v}.txt")
        assert lines[0] == "valence,arousal" and len(lines) == 1 + max(videos[v])
        assert np.abs(np.array([[float(x) for x in ln.split(",")] for ln in lines[1:]])).max() <= 1.0


def test_per_video_abaw1_headers(release, fake, tmp_path):
    """ABAW1's per-video submission: 7 classes (the best of those 7) and the 8-AU header."""
    summary = _write(fake, [], tmp_path, "abaw-per-video", edition="abaw1")
    videos = _test_videos(release)
    assert sorted(p.stem for p in (tmp_path / "AU").glob("*.txt")) == sorted(videos)
    for v in videos:
        au = _lines(tmp_path / "AU" / f"{v}.txt")
        ex = _lines(tmp_path / "EXPR" / f"{v}.txt")
        assert au[0] == "AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25" and all(len(r.split(",")) == 8 for r in au[1:])
        assert ex[0] == "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise"
        assert all(0 <= int(r) <= 6 for r in ex[1:]) and len(ex) == 1 + max(videos[v])
    assert summary["unpredicted_columns"] == ["AU20"]


def test_test_predictions_without_template(release, tmp_path):
    """The old path (no template) on the test split: every frame 1..last of every test video."""
    summary = _predict(release, tmp_path, "abaw-single", [])
    videos = _test_videos(release)
    au = _lines(tmp_path / "AU.txt")
    assert au[0] == "image_location," + ",".join(AU_NAMES)
    assert len(au) == 1 + sum(max(f) for f in videos.values())
    assert summary["videos"] == len(videos)


def test_cli_predict_template(release, tmp_path):
    from click.testing import CliRunner

    from affpipe.cli import main

    template = release["tree"] / TESTSET / "CVPR_6th_ABAW_VA_test_set_example.txt"
    res = CliRunner().invoke(main, ["predict", str(release["ckpt"]), "--shards", str(release["shards"]), "-o",
                                    str(tmp_path), "--split", "test", "--format", "abaw-single", "--template",
                                    str(template), "--backend", "torch", "--num-workers", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "template rows" in res.output and _lines(tmp_path / "VA.txt")[0] == "image_location,valence,arousal"
