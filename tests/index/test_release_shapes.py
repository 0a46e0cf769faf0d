"""Trees shaped like the real Aff-Wild2 downloads (issue 11), byte for byte where it matters.

Each fixture file has the shape the releases have: CRLF and trailing blank lines, trailing
spaces, annotation roots with spaces (``3rd ABAW Annotations/Third ABAW Annotations``), the 2020
``Training_Set`` naming with the 8-AU header, a ``TestSet/`` folder beside the challenge folders,
the names_of_videos lists, the MTL test release (bare paths, gaps) and the ABAW5+ sample files
(``image_location`` header, ``video/00001.jpg,`` rows). The three failures of issue 11 are the
first three tests: each fails on the code before it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from affpipe.index.build import IndexConfig, build_index, format_summary, load_index
from affpipe.index.testsets import read_test_list
from affpipe.labels import AU_NAMES

ABAW1_AU = "AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25"
EXPR7 = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise"
THIRD = "3rd ABAW Annotations/Third ABAW Annotations"


def put(root: Path, rel: str, text: str) -> Path:
    """Write ``text`` exactly (no newline translation)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())
    return path


def crops(root: Path, video: str, frames, image_root: str = "cropped_aligned") -> None:
    import cv2
    import numpy as np

    # A real (tiny) JPEG: shard skips files that are not one (issue 12).
    jpeg = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))[1].tobytes()
    d = root / image_root / video
    d.mkdir(parents=True, exist_ok=True)
    for f in frames:
        (d / f"{f:05d}.jpg").write_bytes(jpeg)


def abaw1_tree(root: Path) -> None:
    """The 2020 public download: annotations/<Task>_Set/{Training_Set,Validation_Set}, CRLF files."""
    put(root, "annotations/VA_Set/Training_Set/video1.txt", "valence,arousal\r\n0.25,-0.1\r\n-5,-5\r\n0.3,0.2\r\n\r\n\r\n")
    put(root, "annotations/VA_Set/Validation_Set/video2.txt", "valence,arousal\n0.1,0.1 \n0.2,0.2  \n\n")
    put(root, "annotations/AU_Set/Training_Set/video1.txt",
        f"{ABAW1_AU}\r\n0,1,0,0,1,0,1,0\r\n-1,-1,-1,-1,-1,-1,-1,-1\r\n1,0,0,1,0,0,0,1\r\n")
    put(root, "annotations/EXPR_Set/Training_Set/video3.txt", f"{EXPR7}\n0\n4\n-1\n6\n")
    crops(root, "cropped_aligned/video1", [1, 2, 3])  # the zip's doubled folder
    crops(root, "cropped_aligned/video2", [1, 2])
    crops(root, "cropped_aligned/video3", [1, 2, 3, 4])
    crops(root, "cropped_aligned/video9", [1, 2, 4])  # a test video: crops, no annotation


def index(root: Path, out: Path, **kw) -> tuple[dict, dict]:
    counts = build_index(IndexConfig(root=root, out=out, workers=1, **kw))
    table, meta = load_index(out)
    rows = {(v, f): i for i, (v, f) in enumerate(zip(table["video"].to_pylist(), table["frame"].to_pylist(), strict=True))}
    return counts, {"table": table, "meta": meta, "rows": rows}


def col(ix: dict, name: str, video: str, frame: int):
    return ix["table"][name][ix["rows"][(video, frame)]].as_py()


def test_training_set_2020_is_indexed(tmp_path):
    """Failure 1: ``Training_Set`` was skipped without a word; its labels are now read."""
    abaw1_tree(tmp_path / "t")
    counts, ix = index(tmp_path / "t", tmp_path / "i")
    assert counts["tasks"]["va"]["train"]["files"] == 1 and counts["tasks"]["au"]["train"]["files"] == 1
    assert counts["tasks"]["expr"]["train"]["valid"] == 3
    assert col(ix, "split", "video1", 1) == "train" and col(ix, "va_valid", "video1", 1)
    assert col(ix, "valence", "video1", 3) == pytest.approx(0.3)
    assert not col(ix, "va_valid", "video1", 2)  # -5
    assert col(ix, "split", "video2", 2) == "val" and col(ix, "arousal", "video2", 2) == pytest.approx(0.2)
    assert col(ix, "expr", "video3", 4) == 6


def test_abaw1_au_header_is_mapped_and_au20_reported(tmp_path):
    """Failure 2: the 8-AU header stopped the index ("unknown column(s) ['AU20']", whatever the
    split folder's spelling); now AUs map by name and AU20 is reported."""
    abaw1_tree(tmp_path / "t")
    (tmp_path / "t/annotations/AU_Set/Training_Set").rename(tmp_path / "t/annotations/AU_Set/Train_Set")
    counts, ix = index(tmp_path / "t", tmp_path / "i")
    got = {a: col(ix, a, "video1", 1) for a in AU_NAMES}
    assert got == {"AU1": 0, "AU2": 1, "AU4": 0, "AU6": 0, "AU7": -1, "AU10": -1, "AU12": 1, "AU15": 0,
                   "AU23": -1, "AU24": -1, "AU25": 0, "AU26": -1}
    assert not col(ix, "au_valid", "video1", 2) and col(ix, "au_valid", "video1", 3)
    assert counts["unused_columns"] == {"au:AU20": {"files": 1, "rows": 3}}
    assert "unused AU column AU20: 3 rows in 1 file(s)" in format_summary(counts)
    assert counts["au_headers"] == {"8 AUs": 1}


def test_test_videos_are_test_not_train(tmp_path):
    """Failure 3: crops without any annotation were ``train``; with no test list they are ``test``."""
    abaw1_tree(tmp_path / "t")
    counts, ix = index(tmp_path / "t", tmp_path / "i")
    assert {col(ix, "split", "video9", f) for f in (1, 2, 4)} == {"test"}
    assert counts["splits"]["test"] == 3 and counts["test"]["rule"].startswith("crops and no annotation")
    assert "test: 1 videos, 3 frames" in format_summary(counts)


def test_test_shards_keep_every_crop_without_labels(tmp_path):
    from affpipe.labels import decode_records
    from affpipe.shards.format import read_manifest
    from affpipe.shards.write import ShardConfig, write_shards

    abaw1_tree(tmp_path / "t")
    # a test list naming an annotated video too: it becomes test, its labels never reach a shard
    put(tmp_path, "lists/va_test_set.txt", "video9\nvideo3\n")
    index(tmp_path / "t", tmp_path / "i", test_lists=(tmp_path / "lists/va_test_set.txt",))
    write_shards(ShardConfig(index=tmp_path / "i", out=tmp_path / "s", split="test", workers=1))
    manifest = read_manifest(tmp_path / "s")
    assert manifest["splits"]["test"]["samples"] == 7  # video9: 3 crops, video3: 4 crops
    import tarfile

    recs = []
    for shard in manifest["splits"]["test"]["shards"]:
        with tarfile.open(tmp_path / "s" / shard["file"]) as tar:
            recs += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".lbl")]
    rec = decode_records(b"".join(recs))
    assert (rec["flags"] == 0).all() and (rec["au"] == -1).all() and (rec["expr"] == -1).all()
    from affpipe.shards import verify_shards

    assert verify_shards(tmp_path / "s") == []


def third_abaw_tree(root: Path) -> None:
    """ABAW3: a root with spaces, TestSet/ beside the challenge folders, lists with CRLF."""
    put(root, f"{THIRD}/VA_Estimation_Challenge/Train_Set/21-24-1920x1080.txt", "valence,arousal\n0.5,0.5\n0.4,0.4\n")
    put(root, f"{THIRD}/VA_Estimation_Challenge/Validation_Set/30-30-1920x1080.txt", "valence,arousal\n0.1,0.1\n")
    put(root, f"{THIRD}/VA_Estimation_Challenge/Train_Set_refinement/21-24-1920x1080.txt", "valence,arousal\n0,0\n")
    put(root, f"{THIRD}/VA_Estimation_Challenge/notes.txt", "not an annotation\n")
    put(root, f"{THIRD}/my_test_set_notes.txt", "todo: run the test set/later\n")  # named like a list, is not
    put(root, f"{THIRD}/TestSet/names_of_videos_in_each_test_set/Valence_Arousal_Estimation_Challenge_test_set_release.txt",
        "video9\r\nvideo10_left \r\n\r\n")
    crops(root, "cropped_aligned/21-24-1920x1080", [1, 2])
    crops(root, "cropped_aligned/30-30-1920x1080", [1])
    crops(root, "cropped_aligned/video9", [1, 3])
    crops(root, "cropped_aligned_new_50_vids/video10_left", [2])
    crops(root, "cropped_aligned/video11", [1])  # crops, no annotation, in no list


def test_third_abaw_root_with_spaces_and_test_lists(tmp_path):
    third_abaw_tree(tmp_path / "t")
    counts, ix = index(tmp_path / "t", tmp_path / "i")
    assert counts["tasks"]["va"]["train"]["files"] == 1 and counts["tasks"]["va"]["val"]["files"] == 1
    assert col(ix, "split", "video9", 3) == "test" and col(ix, "split", "video10_left", 2) == "test"
    assert col(ix, "split", "video11", 1) == "test"  # no annotation: never train, and reported
    t = counts["test"]
    assert t["rule"].startswith("test lists") and t["videos"] == 3
    assert t["unlisted_videos_without_annotation"] == ["video11"]
    reasons = {Path(u["path"]).name: u["reason"] for u in counts["unused"]}
    assert reasons["Train_Set_refinement"].startswith("not a split folder") and "1 .txt" in reasons["Train_Set_refinement"]
    assert reasons["notes.txt"] == "annotation file outside a split folder"
    assert reasons["my_test_set_notes.txt"].startswith("named like a test-set list but not one")
    summary = format_summary(counts)
    assert "Train_Set_refinement: not a split folder" in summary and "notes.txt" in summary
    meta = json.loads((tmp_path / "i" / "index.json").read_text())
    assert meta["counts"]["unused"] == counts["unused"] and meta["layouts"]["test_lists"]


def test_every_layout_together_lists_every_file(tmp_path):
    """All editions in one tree: each annotation file is read or listed as unused, with a reason."""
    root = tmp_path / "t"
    abaw1_tree(root / "abaw1")
    third_abaw_tree(root / "abaw3")
    counts, _ = index(root, tmp_path / "i")
    read = sum(c["files"] for by in counts["tasks"].values() for c in by.values())
    unused_txt = sum(u["txt_files"] for u in counts["unused"])
    lists = {Path(x["path"]).resolve() for x in counts["test"]["lists"]}
    every = [p for p in root.rglob("*.txt") if p.resolve() not in lists]
    assert read + unused_txt == len(every)  # each file: read, a test list, or listed as unused
    assert any("older-edition VA folder (2 .txt file(s) not read)" in u["reason"] for u in counts["unused"])


def test_challenge_folder_with_no_split_folder_is_an_error(tmp_path):
    put(tmp_path, "t/annotations/VA_Set/Train/x.txt", "valence,arousal\n0,0\n")  # 'Train' is known
    put(tmp_path, "u/annotations/VA_Set/Trainset2020/x.txt", "valence,arousal\n0,0\n")
    counts, _ = index(tmp_path / "t", tmp_path / "i")
    assert counts["tasks"]["va"]["train"]["files"] == 1
    with pytest.raises(ValueError, match=r"VA_Set: 1 \.txt file\(s\) but none in a split folder .*Trainset2020"):
        index(tmp_path / "u", tmp_path / "j")
    put(tmp_path, "w/annotations/VA_Set/Training_Set/Training_Set/x.txt", "valence,arousal\n0,0\n")  # unzipped twice
    with pytest.raises(ValueError, match=r"VA_Set: 1 \.txt file\(s\) but none in a split folder"):
        index(tmp_path / "w", tmp_path / "k")


def test_list_shapes(tmp_path):
    names = read_test_list(put(tmp_path, "Action_Unit_Detection_Challenge_test_set_release.txt", "a\r\nb_left \r\n\r\n"))
    assert (names.kind, names.task, names.videos, names.newline) == ("videos", "au", ("a", "b_left"), "\r\n")
    mtl = read_test_list(put(tmp_path, "MTL_Challenge_test_set_release.txt",
                             "image,valence,arousal,expression,aus\nv/00001.jpg\nv/00005.jpg\nw/00002.jpg\n"))
    assert (mtl.kind, mtl.task, mtl.header) == ("frames", "mtl", "image,valence,arousal,expression,aus")
    np.testing.assert_array_equal(mtl.frames, [1, 5, 2])
    sample = read_test_list(put(tmp_path, "CVPR_5th_ABAW_Expr_test_set_sample.txt",
                                f"image_location,{EXPR7},Other\nv/00001.jpg,\nv/00002.jpg,\n"))
    assert (sample.kind, sample.task, sample.images) == ("frames", "expr", ("v/00001.jpg", "v/00002.jpg"))
    old = read_test_list(put(tmp_path, "aus_test_set.txt", "video9\n"))
    assert old.task == "au" and old.videos == ("video9",)
    with pytest.raises(ValueError, match=r"CVPR_6th_ABAW_VA_test_set_example\.txt:3: expected <video>/<frame>\.jpg"):
        read_test_list(put(tmp_path, "CVPR_6th_ABAW_VA_test_set_example.txt", "image_location,valence,arousal\nv/00001.jpg,\nv/1.png,\n"))


def test_cli_index_test_list_stats_and_show(tmp_path):
    """``affpipe index --test-list`` / ``stats`` / ``shard --split test`` / ``show --split test``."""
    from click.testing import CliRunner

    from affpipe.cli import main

    abaw1_tree(tmp_path / "t")
    for v in ("video9",):  # real JPEGs for show
        import cv2

        for f in (1, 2, 4):
            cv2.imwrite(str(tmp_path / "t/cropped_aligned/cropped_aligned" / v / f"{f:05d}.jpg"),
                        np.full((16, 16, 3), 128, np.uint8))
    lst = put(tmp_path, "expression_test_set.txt", "video9\r\n")
    run = CliRunner().invoke
    res = run(main, ["index", str(tmp_path / "t"), "-o", str(tmp_path / "i"), "--test-list", str(lst), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "test: 1 videos, 3 frames; rule: test lists" in res.output and "unused AU column AU20" in res.output
    res = run(main, ["stats", str(tmp_path / "i"), "-o", str(tmp_path / "st")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "st" / "stats.md").read_text()
    assert "## Test split" in md and "1 videos, 3 frames, 3 with an image" in md and "column AU20" in md
    assert "| | train | val | test |" in md
    res = run(main, ["shard", str(tmp_path / "i"), "-o", str(tmp_path / "s"), "--split", "test", "--workers", "1"])
    assert res.exit_code == 0 and "test: 3 samples" in res.output, res.output
    res = run(main, ["show", str(tmp_path / "s"), "-o", str(tmp_path / "g.png"), "--split", "test", "--n", "3"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "g.png").stat().st_size > 0
