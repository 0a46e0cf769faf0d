"""Issue 27: `affpipe crop` under hostile input and faults — one `Error:` line naming the file, or
counted in the summary; never a traceback, never a half tree; resumable to the same bytes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from video import media
from video.media import TEST_SETTINGS

from affpipe.cli import main
from affpipe.video import CropConfig, crop

media.need_detector_and_face()

FLAGS = ["--min-track", "1", "--workers", "2", "--no-progress"]


def _run(*args: str):
    return CliRunner().invoke(main, [*args])


def _one_error(res, *names: str) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    for n in names:
        assert n in errors[0], errors[0]
    return errors[0]


def _face_video(path: Path, n: int = 3, fourcc: str = "MJPG") -> Path:
    return media.write_video(path, media.single_face_frames(n, blank=()), fourcc)


def _files(tree: Path) -> dict[str, bytes]:
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in sorted(tree.rglob("*"))
            if p.is_file() and p.name != ".affpipe.lock"}


# ---- one error line each, before anything is written ----------------------------------------


def _garbage(tmp):
    (tmp / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
    return tmp / "garbage.mp4", "garbage.mp4"


def _empty(tmp):
    (tmp / "empty.mp4").write_bytes(b"")
    return tmp / "empty.mp4", "empty.mp4"


def _truncated_mp4(tmp):
    full = _face_video(tmp / "full.mp4", 6, "mp4v")
    (tmp / "cut.mp4").write_bytes(full.read_bytes()[: full.stat().st_size // 2])  # the index (moov) is at the end
    return tmp / "cut.mp4", "cut.mp4"


def _audio_only(tmp):
    import wave

    with wave.open(str(tmp / "speech.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 8000)
    return tmp / "speech.wav", "speech.wav"


def _text(tmp):
    (tmp / "notes.txt").write_text("not a video\n")
    return tmp / "notes.txt", "notes.txt"


def _missing(tmp):
    return tmp / "nowhere.mp4", "nowhere.mp4"


@pytest.mark.parametrize("make", [_garbage, _empty, _truncated_mp4, _audio_only, _text, _missing],
                         ids=["garbage", "zero-length", "truncated mp4", "audio only", "text file", "missing"])
def test_a_file_that_is_no_video_is_one_error_line_and_writes_nothing(tmp_path, make):
    bad, name = make(tmp_path)
    _one_error(_run("crop", str(bad), "-o", str(tmp_path / "tree"), *FLAGS), name)
    assert not (tmp_path / "tree").exists()


def test_two_inputs_of_one_name_are_refused(tmp_path):
    a = _face_video(tmp_path / "a.avi", 1)
    (tmp_path / "d").mkdir()
    b = _face_video(tmp_path / "d" / "a.avi", 1)
    _one_error(_run("crop", str(a), str(b), "-o", str(tmp_path / "tree"), *FLAGS), "a.avi")


def test_a_missing_detector_package_is_one_line_saying_how_to_install_it(tmp_path, monkeypatch):
    from affpipe import _optional
    from affpipe.video import detect

    def missing():
        raise ImportError(_optional.MTCNN_HINT)

    monkeypatch.setattr(detect, "import_mtcnn", missing)
    clip = _face_video(tmp_path / "v.avi", 1)
    _one_error(_run("crop", str(clip), "-o", str(tmp_path / "tree"), *FLAGS), "pip install --no-deps facenet-pytorch")
    assert not (tmp_path / "tree").exists()


def test_symlinks_in_the_output_are_refused(tmp_path):
    clip = _face_video(tmp_path / "v.avi", 1)
    (tmp_path / "tree").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "tree" / "cropped_aligned").symlink_to(tmp_path / "elsewhere")
    _one_error(_run("crop", str(clip), "-o", str(tmp_path / "tree"), *FLAGS), "cropped_aligned")
    assert not any((tmp_path / "elsewhere").iterdir())


def test_a_folder_of_another_command_or_of_a_user_is_refused(tmp_path):
    clip = _face_video(tmp_path / "v.avi", 1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    _one_error(_run("crop", str(clip), "-o", str(tmp_path / "mine"), *FLAGS), "not empty")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "x"


def test_other_inputs_are_refused_and_overwrite_replaces_only_crops_files(tmp_path):
    a = _face_video(tmp_path / "a.avi", 1)
    b = _face_video(tmp_path / "b.avi", 1)
    tree = tmp_path / "tree"
    assert _run("crop", str(a), "-o", str(tree), *FLAGS).exit_code == 0
    err = _one_error(_run("crop", str(b), "-o", str(tree), *FLAGS), "--overwrite")
    assert "other inputs" in err and "source a" in err and "source b" in err
    _one_error(_run("crop", str(a), "-o", str(tree), *FLAGS, "--min-score", "0.5"), "min_score: 0.9 (in the folder) vs 0.5")
    res = _run("crop", str(b), "-o", str(tree), "--overwrite", *FLAGS)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tree / "cropped_aligned").iterdir()) == ["b"]
    assert sorted(p.name for p in (tree / "crop_tables").iterdir()) == ["b.done.json", "b.parquet"]


# ---- counted, reported, never lost -----------------------------------------------------------


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """One crop over odd but valid inputs: spaces and unicode in paths, a 1-frame video, a video
    with no face, a truncated AVI, a rotated phone video, a huge photo and a broken one, a file
    that is neither, a dot-name video."""
    root = tmp_path_factory.mktemp("odd")
    src = root / "my clips ü"
    src.mkdir()
    _face_video(src / "one frame.avi", 1)
    _face_video(src / "ünï 顔.avi", 3)
    media.write_video(src / "blank.avi", [media.background()] * 3)
    full = _face_video(root / "full.avi", 8)
    (src / "cut.avi").write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    sideways = [cv2.rotate(f, cv2.ROTATE_90_COUNTERCLOCKWISE) for f in media.single_face_frames(3, blank=())]
    media.rotate_mp4(media.write_video(root / "upright.mp4", sideways, "mp4v"), src / "phone.mp4", 90)
    photos = root / "holiday photos"
    photos.mkdir()
    big = np.full((2000, 3000, 3), 90, np.uint8)
    media.place(big, media.astronaut_face(900), 1500, 1000)
    cv2.imwrite(str(photos / "a_big.jpg"), big)
    (photos / "b_broken.jpg").write_bytes(b"\xff\xd8 not really")
    (photos / "c_readme.txt").write_text("x")
    mixed = root / "mixed sizes"  # photos of two sizes with a broken one between: batches never mix sizes
    mixed.mkdir()
    for name, (w, h) in (("1.jpg", (300, 200)), ("3.jpg", (320, 240))):
        img = np.full((h, w, 3), 90, np.uint8)
        media.place(img, media.astronaut_face(), 150, 100)
        cv2.imwrite(str(mixed / name), img)
    (mixed / "2.jpg").write_bytes(b"")
    hidden = _face_video(root / ".hidden.avi", 1)
    tree = root / "tree with space"
    res = _run("crop", str(src), str(photos), str(mixed), str(hidden), "-o", str(tree), *FLAGS)
    return tree, res


def _video(tree: Path, name: str) -> dict:
    import json

    return json.loads((tree / "crop_tables" / f"{name}.done.json").read_text())


def test_odd_inputs_are_cropped_and_reported(odd):
    tree, res = odd
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    assert _video(tree, "one frame")["tracks"] == {"one frame": 1}
    assert _video(tree, "ünï 顔")["tracks"] == {"ünï 顔": 3}
    assert "no face found in 1 video(s): blank" in res.output
    assert _video(tree, "blank")["tracks"] == {} and not (tree / "cropped_aligned" / "blank").exists()


def test_a_truncated_video_keeps_what_decodes_and_is_reported(odd):
    tree, res = odd
    rec = _video(tree, "cut")
    assert 0 < rec["frames"] < 8 and rec["truncated"]
    assert "truncated" in res.output and "cut" in res.output


def test_rotation_metadata_is_honoured(odd):
    tree, res = odd
    rec = _video(tree, "phone")
    assert rec["rotation"] == 90 and rec["tracks"] == {"phone": 3}  # sideways, MTCNN finds no face
    assert "rotation metadata honoured in: phone" in res.output


def test_a_huge_photo_is_detected_small_and_cropped_from_full_resolution(odd):
    tree, res = odd
    rec = _video(tree, "holiday photos")
    assert rec["frames"] == 2 and rec["bad_frames"] == 1 and rec["tracks"] == {"holiday photos": 1}
    import pyarrow.parquet as pq

    rows = pq.read_table(tree / "crop_tables" / "holiday photos.parquet").to_pylist()
    assert rows[0]["time"] is None and rows[0]["box"][2] - rows[0]["box"][0] > 200  # full-resolution pixels
    assert rows[1]["box"] is None  # the broken photo: a frame number with no face
    assert cv2.imread(str(tree / "cropped_aligned" / "holiday photos" / "00001.jpg")).shape == (112, 112, 3)
    assert "unreadable photos (frames without a crop): 2" in res.output
    rec = _video(tree, "mixed sizes")
    assert rec["frames"] == 3 and rec["bad_frames"] == 1 and rec["tracks"] == {"mixed sizes": 2}
    assert "not read (neither video nor photo): 1 file(s)" in res.output


def test_a_name_index_would_skip_is_mapped(odd):
    tree, _ = odd
    names = [p.name for p in (tree / "cropped_aligned").iterdir()]
    mapped = [n for n in names if n.startswith("_hidden-")]
    assert len(mapped) == 1 and not any(n.startswith(".") for n in names)


# ---- same bytes: reruns and kill -9 ------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two 5-frame one-face videos and their tree (the reference bytes)."""
    root = tmp_path_factory.mktemp("small")
    (root / "in").mkdir()
    for name in ("a", "b"):
        _face_video(root / "in" / f"{name}.avi", 5)
    crop(CropConfig(inputs=(root / "in",), out=root / "ref", **TEST_SETTINGS))
    return root


def test_a_rerun_gives_the_same_bytes(small, tmp_path):
    crop(CropConfig(inputs=(small / "in",), out=tmp_path / "again", **TEST_SETTINGS))
    assert _files(tmp_path / "again") == _files(small / "ref")


def test_a_rerun_in_place_skips_done_videos(small, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(small / "ref", tree)
    s = crop(CropConfig(inputs=(small / "in",), out=tree, **TEST_SETTINGS))
    assert s["resumed"] == 2 and _files(tree) == _files(small / "ref")


def test_an_unfinished_video_is_redone_cleanly(small, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(small / "ref", tree)
    (tree / "crop_tables" / "b.done.json").unlink()
    (tree / "crop_tables" / "b.plan.json").write_text('{"name": "b", "folders": ["b"]}')
    (tree / "cropped_aligned" / "b" / "00002.jpg").write_bytes(b"\xff\xd8half")
    (tree / "cropped_aligned" / "b" / "00003.jpg").unlink()
    (tree / "cropped_aligned" / "b" / "00004.jpg.tmp").write_bytes(b"x")
    s = crop(CropConfig(inputs=(small / "in",), out=tree, **TEST_SETTINGS))
    assert s["resumed"] == 1 and _files(tree) == _files(small / "ref")


def test_leftovers_of_a_kill_between_writes_are_tidied(small, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(small / "ref", tree)
    (tree / "crop_tables" / "a.plan.json").write_text('{"name": "a", "folders": ["a"]}')  # done, then killed
    for name in ("a.done.json.tmp", "b.parquet.tmp", "b.plan.json.tmp"):
        (tree / "crop_tables" / name).write_bytes(b"half")
    s = crop(CropConfig(inputs=(small / "in",), out=tree, **TEST_SETTINGS))
    assert s["resumed"] == 2 and _files(tree) == _files(small / "ref")


def test_kill_9_then_rerun_gives_the_same_bytes(small, tmp_path):
    tree = tmp_path / "tree"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "affpipe", "crop", str(small / "in"), "-o", str(tree),
                             "--min-track", "4", "--workers", "2", "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (tree / "crop_tables" / "a.done.json").exists():
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    s = crop(CropConfig(inputs=(small / "in",), out=tree, **TEST_SETTINGS))
    assert s["videos"] == 2 and _files(tree) == _files(small / "ref")
