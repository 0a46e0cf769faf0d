"""Issue 27: `affpipe predict RUN --video`, `Run.predict` on crops, and `affpipe export` — on the
astronaut test videos with the session's tiny per-frame run."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from video import media

from affpipe.cli import main

media.need_detector_and_face()

CROP = {"min_track": 4, "workers": 2}


def _run(cfg_world: Path) -> Path:
    from affpipe.run.folder import RunFolder

    return RunFolder(cfg_world / "runs" / "frame").best


@pytest.fixture(scope="module")
def predicted(clips, trained_world, tmp_path_factory):
    from affpipe.runs.video import VideoPredictConfig, predict_video

    out = tmp_path_factory.mktemp("pv") / "out"
    cfg = VideoPredictConfig(run=trained_world / "runs" / "frame", videos=(clips / "single.avi",), out=out,
                             overlay=True, device="cpu", progress=False, crop=CROP)
    return cfg, predict_video(cfg)


def test_one_row_per_decoded_frame_and_probabilities(predicted):
    cfg, summary = predicted
    n = len(media.single_face_frames())
    t = pq.read_table(cfg.out / "single.parquet").to_pydict()
    assert t["frame"] == list(range(1, n + 1))
    lines = (cfg.out / "single.csv").read_text().splitlines()
    assert len(lines) == n + 1 and lines[0].startswith("frame,time,face,valence,arousal,p_Neutral")
    face = np.asarray(t["face"], bool)
    assert face.tolist() == [i not in (7, 8, 9) for i in range(1, n + 1)]
    expr = np.array([[t[f"p_{c}"][i] for c in media_classes()] for i in np.flatnonzero(face)], np.float64)
    assert np.allclose(expr.sum(1), 1.0, atol=1e-5)
    au = np.array([[t[f"p_{a}"][i] for a in au_names()] for i in np.flatnonzero(face)], np.float64)
    assert ((au >= 0) & (au <= 1)).all()
    for i in np.flatnonzero(~face):  # blank frames: empty predictions, never made up
        assert t["valence"][i] is None and t["p_Neutral"][i] is None and t["AU1"][i] is None
        assert lines[i + 1].split(",")[3:] == [""] * (len(lines[0].split(",")) - 3)
    track = summary["tracks"][0]
    assert track["rows_empty"] == 3 and summary["frames_without_face"] == 3
    assert summary["au_thresholds_from"].startswith("0.5")


def media_classes():
    from affpipe.labels import EXPR_CLASSES

    return EXPR_CLASSES


def au_names():
    from affpipe.labels import AU_NAMES

    return AU_NAMES


def test_plot_and_overlay_are_readable(predicted):
    cfg, _ = predicted
    png = cv2.imread(str(cfg.out / "single.png"))
    assert png is not None and png.shape[0] > 100
    cap = cv2.VideoCapture(str(cfg.out / "single.overlay.avi"))
    frames = 0
    while cap.read()[0]:
        frames += 1
    cap.release()
    assert frames == len(media.single_face_frames())


def test_rerun_gives_the_same_bytes(predicted):
    from affpipe.runs.video import predict_video

    cfg, _ = predicted
    names = ("single.csv", "single.parquet", "single.png", "summary.json")
    before = {n: (cfg.out / n).read_bytes() for n in names}
    again = predict_video(cfg)
    assert again["crops_reused"] == 1
    assert {n: (cfg.out / n).read_bytes() for n in names} == before


def test_run_predict_api_matches_the_csv(predicted, trained_world):
    from affpipe.runs import RunInputs, open_run

    cfg, _ = predicted
    run = open_run(RunInputs(run=trained_world / "runs" / "frame"))
    img = cv2.cvtColor(cv2.imread(str(cfg.out / "crops" / "cropped_aligned" / "single" / "00001.jpg")),
                       cv2.COLOR_BGR2RGB)
    p = run.predict([img, img], device="cpu")
    assert p["expr_probs"].shape == (2, 8) and p["au_probs"].shape == (2, 12) and p["valence"].shape == (2,)
    t = pq.read_table(cfg.out / "single.parquet").to_pydict()
    assert p["valence"][0] == pytest.approx(t["valence"][0], abs=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        run.predict(np.zeros((1, 112, 112, 3), np.float32))


def test_a_kind_without_heads_refuses_images():
    from affpipe.pretrain.kind import PRETRAIN
    from affpipe.run.kind import CropContext

    with pytest.raises(ValueError, match="does not predict from face crops"):
        PRETRAIN.image_model(None, {}, "runs/ssl/best.pt", CropContext())


def test_export_round_trip_and_tamper(predicted, trained_world, tmp_path):
    from affpipe.runs import RunInputs, open_run

    cfg, _ = predicted
    f = tmp_path / "m.safetensors"
    res = CliRunner().invoke(main, ["export", str(trained_world / "runs" / "frame"), "-o", str(f)])
    assert res.exit_code == 0, res.output
    assert f.stat().st_size < _run(trained_world).stat().st_size
    imgs = np.stack([cv2.imread(str(p))[..., ::-1] for p in
                     sorted((cfg.out / "crops" / "cropped_aligned" / "single").iterdir())[:4]])
    a = open_run(RunInputs(run=trained_world / "runs" / "frame")).predict(imgs, device="cpu")
    b = open_run(RunInputs(run=f)).predict(imgs, device="cpu")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    from affpipe.run.exported import read_export

    meta = read_export(f)["export"]
    from affpipe.io import sha256_file

    assert meta["source_sha256"] == sha256_file(_run(trained_world))
    # predict --video takes the export in place of the run folder: the same CSV
    res = CliRunner().invoke(main, ["predict", str(f), "--video", str(cfg.videos[0]), "-o", str(tmp_path / "pv"),
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "pv" / "single.csv").read_bytes() == (cfg.out / "single.csv").read_bytes()
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # a byte of the last tensor
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    res = CliRunner().invoke(main, ["predict", str(bad), "--video", str(cfg.videos[0]), "-o", str(tmp_path / "pv2")])
    assert res.exit_code == 1 and res.output.count("Error:") == 1 and "does not match the digest" in res.output
    assert not (tmp_path / "pv2").exists()


@pytest.mark.parametrize("case", ["missing", "not_a_video", "not_a_run"])
def test_bad_input_is_one_error_line(case, clips, trained_world, tmp_path):
    run, video = trained_world / "runs" / "frame", clips / "single.avi"
    if case == "missing":
        video = tmp_path / "nope.mp4"
    elif case == "not_a_video":
        video = tmp_path / "text.mp4"
        video.write_text("hello, not a video\n")
    else:
        run = tmp_path / "empty_run"
        run.mkdir()
    res = CliRunner().invoke(main, ["predict", str(run), "--video", str(video), "-o", str(tmp_path / "o")])
    assert res.exit_code != 0 and res.output.count("Error:") == 1, res.output
    assert not (tmp_path / "o").exists()


def test_a_video_without_a_face_is_one_file_of_empty_rows(trained_world, tmp_path):
    from affpipe.runs.video import VideoPredictConfig, predict_video

    clip = media.write_video(tmp_path / "blank.avi", [media.background() for _ in range(5)])
    s = predict_video(VideoPredictConfig(run=trained_world / "runs" / "frame", videos=(clip,), out=tmp_path / "o",
                                         device="cpu", progress=False, crop=CROP))
    assert [t["track"] for t in s["tracks"]] == ["blank"] and s["frames_without_face"] == 5
    lines = (tmp_path / "o" / "blank.csv").read_text().splitlines()
    assert len(lines) == 6 and all(ln.split(",")[2] == "0" for ln in lines[1:])
    assert cv2.imread(str(tmp_path / "o" / "blank.png")) is not None


def test_export_never_replaces_a_foreign_file(trained_world, tmp_path):
    import torch
    from safetensors.torch import save_file

    user = tmp_path / "user.safetensors"
    save_file({"x": torch.zeros(1)}, str(user))
    before = user.read_bytes()
    run = str(trained_world / "runs" / "frame")
    for extra, says in (([], "--overwrite"), (["--overwrite"], "not an affpipe export")):
        res = CliRunner().invoke(main, ["export", run, "-o", str(user), *extra])
        assert res.exit_code == 1 and res.output.count("Error:") == 1 and says in res.output, res.output
    assert user.read_bytes() == before
    res = CliRunner().invoke(main, ["export", run, "-o", str(tmp_path / "m.pt")])
    assert res.exit_code == 1 and ".safetensors" in res.output
