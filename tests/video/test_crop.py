"""Issue 27: `affpipe crop` on a real face (scikit-image's astronaut) — tracks, names, alignment,
the table, and `affpipe index` reading the tree."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from video import media

from affpipe.cli import main
from affpipe.video import TEMPLATE_112, FaceDetector, similarity_matrix

media.need_detector_and_face()


def _table(tree: Path, video: str):
    return pq.read_table(tree / "crop_tables" / f"{video}.parquet").to_pylist()


def test_one_face_is_one_track_through_blank_frames(cropped):
    tree, summary = cropped
    single = next(r for r in summary["per_video"] if r["name"] == "single")
    assert list(single["tracks"]) == ["single"]
    jpgs = sorted(p.name for p in (tree / "cropped_aligned" / "single").iterdir())
    n = len(media.single_face_frames())
    assert jpgs == [f"{i:05d}.jpg" for i in range(1, n + 1) if i not in (7, 8, 9)]
    assert cv2.imread(str(tree / "cropped_aligned" / "single" / "00001.jpg")).shape == (112, 112, 3)


def test_two_faces_are_left_and_right(cropped):
    tree, summary = cropped
    pair = next(r for r in summary["per_video"] if r["name"] == "pair")
    assert pair["tracks"] == {"pair_left": 10, "pair_right": 7}
    assert not (tree / "cropped_aligned" / "pair").exists()
    rows = [r for r in _table(tree, "pair") if r["folder"] == "pair_right"]
    assert [r["frame"] for r in rows] == list(range(4, 11))
    assert all(r["box"][0] > 100 for r in rows)  # the mirrored face is the one on the right


def test_no_face_on_blank_frames_and_one_row_per_frame(cropped):
    tree, _ = cropped
    rows = _table(tree, "single")
    assert [r["frame"] for r in rows] == list(range(1, len(media.single_face_frames()) + 1))
    for r in rows:
        blank = r["frame"] in (7, 8, 9)
        assert (r["track"] is None) == blank and (r["box"] is None) == blank and (r["image"] is None) == blank
    times = [r["time"] for r in rows]
    assert times == pytest.approx([i / media.FPS for i in range(len(rows))], abs=1e-3)
    pair = _table(tree, "pair")
    assert sorted({r["frame"] for r in pair}) == list(range(1, 11))
    assert len(pair) == 10 + 7  # two rows where two faces


def _near_template(points: np.ndarray, slack: float = 0.0) -> None:
    """A similarity cannot put five points of a real face exactly on the template (the
    astronaut's mouth and nose sit ~5 px off the mean face's): eyes within 3 px, every point
    within 8, the mean within 5 (the fit itself is exact on exact points: test_align.py)."""
    d = np.hypot(*(np.asarray(points, np.float64) - TEMPLATE_112).T)
    assert d[:2].max() < 3.0 + slack and d.max() < 8.0 + slack and d.mean() < 5.0 + slack, d


def test_landmarks_land_on_the_template(cropped):
    tree, _ = cropped
    rows = [r for r in _table(tree, "single") if r["landmarks"]]
    for r in rows:  # the transform maps the detected points near the template
        pts = np.asarray(r["landmarks"], np.float64).reshape(5, 2)
        m = similarity_matrix(pts)
        mapped = pts @ m[:, :2].T + m[:, 2]
        _near_template(mapped)
    # and the crop written is that warp: the detector finds the points about where the warp put them
    det = FaceDetector("cpu", min_face=40)
    for r in rows[:3]:
        pts = np.asarray(r["landmarks"], np.float64).reshape(5, 2)
        m = similarity_matrix(pts)
        img = cv2.imread(str(tree / "cropped_aligned" / r["image"]))
        big = cv2.cvtColor(cv2.resize(img, (224, 224), interpolation=cv2.INTER_CUBIC), cv2.COLOR_BGR2RGB)
        found = det.detect(big[None], scale=2.0)[0]
        assert len(found.scores) >= 1
        again = found.landmarks[int(np.argmax(found.scores))]
        d = np.hypot(*(again - (pts @ m[:, :2].T + m[:, 2])).T)
        assert d[:2].max() < 4.0 and d.mean() < 5.0, d


def test_the_table_holds_boxes_scores_and_times(cropped):
    tree, _ = cropped
    r = next(r for r in _table(tree, "single") if r["box"])
    x1, y1, x2, y2 = r["box"]
    assert 0 <= x1 < x2 <= media.W and 0 <= y1 < y2 <= media.H
    assert r["score"] > 0.9 and len(r["landmarks"]) == 10
    assert r["image"] == f"single/{r['frame']:05d}.jpg"


def test_index_reads_the_tree_as_test_videos(cropped, tmp_path):
    """`affpipe index` reads cropped_aligned/ as an image root; videos without annotations are
    split test. (index needs one annotation source in ROOT: here an empty MTL file.)"""
    tree, _ = cropped
    root = tmp_path / "root"
    (root / "MTL_Challenge").mkdir(parents=True)
    (root / "MTL_Challenge" / "train_set.txt").write_text("image,valence,arousal,expression,aus\n")
    res = CliRunner().invoke(main, ["index", str(root), "--images", str(tree / "cropped_aligned"),
                                    "-o", str(tmp_path / "idx")])
    assert res.exit_code == 0, res.output
    frames = pq.read_table(tmp_path / "idx" / "frames.parquet").to_pylist()
    assert {f["split"] for f in frames} == {"test"}
    assert {f["video"] for f in frames} == {"single", "pair_left", "pair_right"}
    assert sum(f["has_image"] for f in frames) == 11 + 10 + 7


def test_index_reads_the_bare_tree(cropped, tmp_path):
    tree, _ = cropped
    res = CliRunner().invoke(main, ["index", str(tree), "-o", str(tmp_path / "idx")])
    assert res.exit_code == 0, res.output
    assert "no annotation files in this tree" in res.output
    frames = pq.read_table(tmp_path / "idx" / "frames.parquet").to_pylist()
    assert {f["split"] for f in frames} == {"test"}
    assert {f["video"] for f in frames} == {"single", "pair_left", "pair_right"}
    assert sum(f["has_image"] for f in frames) == 11 + 10 + 7


def test_index_still_refuses_a_folder_of_neither_labels_nor_crops(tmp_path):
    """A wrong folder (no annotations, no <video>/<frame>.jpg root) stays one clear error."""
    (tmp_path / "wrong" / "notes").mkdir(parents=True)
    (tmp_path / "wrong" / "notes" / "a.txt").write_text("hello\n")
    res = CliRunner().invoke(main, ["index", str(tmp_path / "wrong"), "-o", str(tmp_path / "idx")])
    assert res.exit_code != 0
    assert res.output.count("Error:") == 1 and "no image root" in res.output, res.output
    assert not (tmp_path / "idx").exists()


@pytest.mark.gpu
def test_cuda_finds_the_same_tracks_as_the_cpu(clips, cropped, tmp_path):
    """The batched stages on the GPU: same tracks and crops, landmarks within a pixel of the CPU's."""
    from video.media import TEST_SETTINGS

    from affpipe.video import CropConfig, crop

    tree, cpu = cropped
    gpu = crop(CropConfig(inputs=(clips,), out=tmp_path / "tree", device="cuda", **TEST_SETTINGS))
    assert [(r["name"], r["tracks"]) for r in gpu["per_video"]] == [(r["name"], r["tracks"]) for r in cpu["per_video"]]
    assert {r["device"] for r in gpu["per_video"]} == {"cuda"}
    for video in ("single", "pair"):
        a, b = _table(tree, video), _table(tmp_path / "tree", video)
        for ra, rb in zip(a, b, strict=True):
            assert ra["frame"] == rb["frame"] and ra["folder"] == rb["folder"]
            if ra["landmarks"]:
                assert np.abs(np.subtract(ra["landmarks"], rb["landmarks"])).max() < 1.0
