"""Issue 27: a temporal run on face crops and videos — the frozen encoders of its feature tables
rebuilt and checked, the track's windows averaged as ``evaluate`` averages them, exported whole."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from affpipe.cli import main

CPU = torch.device("cpu")


def _table_predictions(run, model, split: str = "val") -> dict[str, dict[int, np.ndarray]]:
    """Per video, frame → ``model``'s outputs through the run's feature table (what `evaluate` scores)."""
    from affpipe.runs.open import _probabilities

    ids, outs = [], {}
    with torch.inference_mode():
        for b in run.batches(split, CPU):
            ids.append(b.row_id.numpy())
            for t, y in model(b.images).items():
                outs.setdefault(t, []).append(y.float().numpy())
    rid = np.concatenate(ids)
    probs = _probabilities(outs, run.cfg.heads, len(rid))
    video, frame = run.frames_of(rid)
    per: dict[str, dict[int, np.ndarray]] = {}
    for i, (v, f) in enumerate(zip(video, frame, strict=True)):
        per.setdefault(str(v), {})[int(f)] = np.concatenate([probs["valence"][i:i + 1], probs["arousal"][i:i + 1],
                                                            probs["expr_probs"][i], probs["au_probs"][i]])
    return per


def _crops(tree: Path, video: str, frames: list[int]) -> np.ndarray:
    return np.stack([cv2.cvtColor(cv2.imread(str(tree / "cropped_aligned" / video / f"{f:05d}.jpg")), cv2.COLOR_BGR2RGB)
                     for f in frames])


def _flat(p: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([p["valence"][:, None], p["arousal"][:, None], p["expr_probs"], p["au_probs"]], 1)


def test_temporal_run_on_crops_gives_what_evaluate_gives(trained_world, synth_tree):
    """The crops of a validation video, frames with no crop left out (gaps), through
    ``Run.predict``: the same outputs as the run's evaluation windows over its feature table."""
    from affpipe.runs import RunInputs, open_run

    run = open_run(RunInputs(run=trained_world / "runs" / "temporal"))
    model = run.model(CPU)
    torch.manual_seed(0)  # a tiny run's context heads are still near their zero start: give them weight
    with torch.no_grad():
        for layer in model.head.out.context.values():
            layer.weight.normal_(0, 0.5)
    table = _table_predictions(run, model)
    video = sorted(table)[0]
    frames = sorted(table[video])
    assert len(frames) > 2 * run.cfg.data.temporal.window  # several overlapping windows
    crops = open_run(RunInputs(run=trained_world / "runs" / "temporal"), data=False).image_model(CPU)
    crops.head.load_state_dict(model.state_dict())
    p = run.predict(_crops(synth_tree, video, frames), frames, device="cpu", model=crops)
    want = np.stack([table[video][f] for f in frames])
    assert np.abs(_flat(p) - want).max() < 1e-4  # seen: 6e-8 (the table's loader decodes with OpenCV too)
    # the frames matter to a temporal run (gaps are gaps, not collapsed): the same crops, cut in two
    half = len(frames) // 2
    shifted = np.array(frames[:half] + [f + 1000 for f in frames[half:]])
    q = run.predict(_crops(synth_tree, video, frames), shifted, device="cpu", model=crops)
    assert np.abs(_flat(q) - _flat(p)).max() > 1e-3
    # and nothing about the order is lost for a per-frame run
    frame_run = open_run(RunInputs(run=trained_world / "runs" / "frame"), data=False)
    a = frame_run.predict(_crops(synth_tree, video, frames[:8]), frames[:8], device="cpu")
    b = frame_run.predict(_crops(synth_tree, video, frames[:8]), np.array(frames[:8]) * 7, device="cpu")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_temporal_run_on_a_video_writes_one_row_per_frame(trained_world, clips, tmp_path):
    from video import media

    res = CliRunner().invoke(main, ["predict", str(trained_world / "runs" / "temporal"), "--video",
                                    str(clips / "single.avi"), "-o", str(tmp_path / "o"), "--device", "cpu",
                                    "--au-thresholds", "0.3"])
    assert res.exit_code == 0, res.output
    assert "given (--au-thresholds)" in res.output
    t = pq.read_table(tmp_path / "o" / "single.parquet").to_pydict()
    n = len(media.single_face_frames())
    assert t["frame"] == list(range(1, n + 1))
    face = np.asarray(t["face"], bool)
    assert (~face).sum() >= 3 and all(t["valence"][i] is None for i in np.flatnonzero(~face))
    au = np.array([t["p_AU1"][i] for i in np.flatnonzero(face)])
    assert ((au >= 0) & (au <= 1)).all()
    assert [t["AU1"][i] for i in np.flatnonzero(face)] == [int(a >= 0.3) for a in au]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["kind"] == "temporal" and summary["au_thresholds"] == [0.3] * 12


def test_exported_temporal_run_carries_its_encoders(trained_world, synth_tree, tmp_path):
    """The export alone predicts on crops: the same numbers, with the feature table and the
    per-frame run it came from gone."""
    from affpipe.runs import RunInputs, open_run

    world = tmp_path / "w"
    shutil.copytree(trained_world, world)
    f = tmp_path / "t.safetensors"
    res = CliRunner().invoke(main, ["export", str(world / "runs" / "temporal"), "-o", str(f)])
    assert res.exit_code == 0, res.output
    frames = list(range(1, 30))
    video = sorted(p.name for p in (synth_tree / "cropped_aligned").iterdir())[0]
    have = [f_ for f_ in frames if (synth_tree / "cropped_aligned" / video / f"{f_:05d}.jpg").is_file()]
    imgs = _crops(synth_tree, video, have)
    a = open_run(RunInputs(run=world / "runs" / "temporal"), data=False).predict(imgs, have, device="cpu")
    shutil.rmtree(world / "feats")
    shutil.rmtree(world / "runs" / "frame")
    b = open_run(RunInputs(run=f)).predict(imgs, have, device="cpu")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # the run folder itself no longer finds its encoder: one line naming the table
    with pytest.raises(FileNotFoundError, match="feature table .* is not there"):
        open_run(RunInputs(run=world / "runs" / "temporal"), data=False).predict(imgs, have, device="cpu")


@pytest.mark.parametrize("case", ["source_changed", "source_gone", "frames_backwards", "frames_count"])
def test_hostile_temporal_crops_are_one_line(case, copy_world, synth_tree):
    from affpipe.run.folder import RunFolder
    from affpipe.runs import RunInputs, open_run

    run = open_run(RunInputs(run=copy_world / "runs" / "temporal"), data=False)
    video = sorted(p.name for p in (synth_tree / "cropped_aligned").iterdir())[0]
    imgs = _crops(synth_tree, video, [1, 2, 3])
    frames: list[int] = [1, 2, 3]
    best = RunFolder(copy_world / "runs" / "frame").best
    if case == "source_changed":  # the per-frame checkpoint the table was embedded with, trained on
        state = torch.load(best, weights_only=True)
        state["step"] = 999
        torch.save(state, best)
        expect, err = "does not belong|do not belong together", ValueError
    elif case == "source_gone":
        best.unlink()
        expect, err = "which is not there", FileNotFoundError
    elif case == "frames_backwards":
        frames = [3, 2, 1]
        expect, err = "increase strictly", ValueError
    else:
        frames = [1, 2]
        expect, err = "one per crop", ValueError
    with pytest.raises(err, match=expect) as info:
        run.predict(imgs, frames, device="cpu")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value,says", [("2", "not a threshold"), ("0.1,0.2", "2 values"), ("nan", "not a threshold"),
                                        ("x", "numbers in")])
def test_bad_au_thresholds_flag_is_one_line(value, says, trained_world, clips, tmp_path):
    res = CliRunner().invoke(main, ["predict", str(trained_world / "runs" / "frame"), "--video",
                                    str(clips / "single.avi"), "-o", str(tmp_path / "o"), "--au-thresholds", value])
    assert res.exit_code == 2 and says in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_au_thresholds_flag_sets_the_submission_labels(trained_world, tmp_path):
    """`predict --au-thresholds` on a split: 1.0 decides no AU anywhere, 0.0 every AU."""
    run = str(trained_world / "runs" / "frame")
    for value, want in (("1", "0"), ("0", "1")):
        out = tmp_path / f"p{value}"
        res = CliRunner().invoke(main, ["predict", run, "-o", str(out), "--au-thresholds", value, "--device", "cpu",
                                        "--backend", "torch", "--num-workers", "0"])
        assert res.exit_code == 0, res.output
        files = sorted((out / "AU").glob("*.txt"))
        assert files
        cells = {c for f in files for line in f.read_text().splitlines()[1:] for c in line.split(",")}
        assert cells == {want}


def test_nan_weights_are_one_line_not_nan_rows(copy_world, synth_tree):
    from affpipe.run.folder import RunFolder
    from affpipe.runs import RunInputs, open_run

    best = RunFolder(copy_world / "runs" / "frame").best
    state = torch.load(best, weights_only=True)
    state["model"]["heads.va.weight"][0, 0] = float("nan")
    torch.save(state, best)
    video = sorted(p.name for p in (synth_tree / "cropped_aligned").iterdir())[0]
    with pytest.raises(ValueError, match="3 of 3 crops gave NaN") as info:
        open_run(RunInputs(run=copy_world / "runs" / "frame"), data=False).predict(
            _crops(synth_tree, video, [1, 2, 3]), device="cpu")
    assert "\n" not in str(info.value)


def test_moved_feature_tables_are_named_and_found_with_features(copy_world, clips, tmp_path):
    shutil.move(copy_world / "feats", copy_world / "moved")
    run, clip = str(copy_world / "runs" / "temporal"), str(clips / "single.avi")
    res = CliRunner().invoke(main, ["predict", run, "--video", clip, "-o", str(tmp_path / "a"), "--device", "cpu"])
    assert res.exit_code == 1 and res.output.count("Error:") == 1 and "--features" in res.output, res.output
    assert not (tmp_path / "a").exists()
    res = CliRunner().invoke(main, ["predict", run, "--video", clip, "-o", str(tmp_path / "b"), "--device", "cpu",
                                    "--features", str(copy_world / "moved")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b" / "single.csv").is_file()
