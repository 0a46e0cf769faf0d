"""Index: every edition's layout, images vs lines, the split rule, MTL, errors, synth truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import affpipe.index.build as index_mod
from affpipe.index.build import IndexConfig, build_index, image_path, load_index
from affpipe.labels import AU_NAMES, EXPR_CLASSES, FRAMES_SCHEMA

LAYOUTS = {  # edition -> (annotation root, challenge folders, expr classes, image roots)
    "abaw2": ("annotations", ("VA_Set", "EXPR_Set", "AU_Set"), 7, ("cropped_aligned",)),
    "abaw3": ("3rd ABAW Annotations",
              ("VA_Estimation_Challenge", "EXPR_Classification_Challenge", "AU_Detection_Challenge"), 8,
              ("cropped_aligned",)),
    "abaw5": ("5th_ABAW_Annotations",
              ("VA_Estimation_Challenge", "EXPR_Classification_Challenge", "AU_Detection_Challenge"), 8,
              ("cropped_aligned", "cropped_aligned_new_50_vids")),
    "abaw6": ("6th ABAW Annotations",
              ("VA_Estimation_Challenge", "EXPR_Recognition_Challenge", "AU_Detection_Challenge"), 8,
              ("cropped_aligned", "cropped_aligned_new_50_vids")),
}


def write_task(root: Path, edition: str, task: str, split: str, video: str, rows: list, header: str | None = None,
               nl: str = "\n") -> Path:
    """Write one annotation file; ``rows`` are lists of values (or raw strings)."""
    ann, dirs, ncls, _ = LAYOUTS[edition]
    folder = dict(zip(("va", "expr", "au"), dirs, strict=False))[task]
    path = root / ann / folder / ("Train_Set" if split == "train" else "Validation_Set") / f"{video}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if header is None:
        header = {"va": "valence,arousal", "expr": ",".join(EXPR_CLASSES[:ncls]), "au": ",".join(AU_NAMES)}[task]
    body = "".join((r if isinstance(r, str) else ",".join(map(str, r))) + nl for r in rows)
    path.write_text(header + nl + body, newline="")
    return path


def write_images(root: Path, video: str, frames, image_root: str = "cropped_aligned") -> None:
    d = root / image_root / video
    d.mkdir(parents=True, exist_ok=True)
    for f in frames:
        (d / f"{f:05d}.jpg").write_bytes(b"\xff\xd8\xff\xd9")


def small_tree(root: Path, edition: str) -> None:
    """Two videos per edition: a train one with all tasks, a val one whose last image root is the newest."""
    ncls = LAYOUTS[edition][2]
    write_task(root, edition, "va", "train", "a", [[0.5, -0.5], [-5, -5], [0.25, 1]])
    write_task(root, edition, "expr", "train", "a", [[ncls - 1], [-1], [0]])
    write_task(root, edition, "au", "train", "a", [[1] * 12, [-1] * 12, [0] * 12])
    write_images(root, "a", [1, 2, 3])
    write_task(root, edition, "va", "val", "b", [[0.1, 0.2], [0.3, 0.4]])
    write_images(root, "b", [1, 2], LAYOUTS[edition][3][-1])


def index(root: Path, out: Path, **kw) -> tuple[dict, pa.Table, dict]:
    counts = build_index(IndexConfig(root=root, out=out, **kw))
    table, meta = load_index(out)
    return counts, table, meta


def rows(table: pa.Table) -> dict[tuple[str, int], dict]:
    return {(r["video"], r["frame"]): r for r in table.to_pylist()}


@pytest.mark.parametrize("edition", list(LAYOUTS))
def test_each_edition_layout(tmp_path, edition):
    small_tree(tmp_path / "tree", edition)
    counts, table, meta = index(tmp_path / "tree", tmp_path / "idx")
    assert table.schema == FRAMES_SCHEMA
    assert table.column("row_id").to_pylist() == list(range(5))
    assert counts["frames"] == 5 and counts["with_image"] == 5
    names = {t: c["name"] for t, c in meta["layouts"]["challenges"].items()}
    assert names == dict(zip(("va", "expr", "au"), LAYOUTS[edition][1], strict=False))
    roots = [Path(p).name for p in meta["image_roots"]]
    assert roots == list(LAYOUTS[edition][3])
    r = rows(table)
    assert r[("a", 1)]["valence"] == 0.5 and r[("a", 1)]["expr"] == LAYOUTS[edition][2] - 1
    assert r[("a", 1)]["AU26"] == 1 and r[("a", 1)]["au_valid"]
    assert not r[("a", 2)]["va_valid"] and np.isnan(r[("a", 2)]["valence"])
    assert not r[("a", 2)]["expr_valid"] and r[("a", 2)]["expr"] == -1
    assert not r[("a", 2)]["au_valid"] and r[("a", 2)]["AU1"] == -1
    assert r[("b", 2)]["split"] == "val" and r[("b", 2)]["image_root"] == len(roots) - 1
    p = image_path(meta, r[("b", 2)]["image_root"], r[("b", 2)]["image"])
    assert p.is_file() and p.parent.name == "b"
    assert counts["tasks"]["va"]["train"] == {"files": 1, "lines": 3, "valid": 2, "valid_with_image": 2}


def test_abaw2_expr_7_classes_recorded(tmp_path):
    small_tree(tmp_path / "t", "abaw2")
    counts, table, _ = index(tmp_path / "t", tmp_path / "i")
    assert counts["expr_headers"] == {"7 classes": 1} and counts["au_headers"] == {"12 AUs": 1}
    assert rows(table)[("a", 1)]["expr"] == EXPR_CLASSES.index("Surprise")


def test_missing_images_and_line_image_mismatch(tmp_path):
    root = tmp_path / "t"
    write_task(root, "abaw6", "va", "train", "more_lines", [[0.1, 0.1]] * 5)
    write_images(root, "more_lines", [1, 3])
    write_task(root, "abaw6", "va", "train", "fewer_lines", [[0.1, 0.1]] * 2)
    write_images(root, "fewer_lines", [1, 2, 3, 4])
    counts, table, _ = index(root, tmp_path / "i")
    r = rows(table)
    assert [f for v, f in r if v == "more_lines"] == [1, 2, 3, 4, 5]
    assert [r[("more_lines", f)]["has_image"] for f in range(1, 6)] == [True, False, True, False, False]
    assert r[("more_lines", 2)]["image"] is None and r[("more_lines", 2)]["image_root"] == -1
    assert r[("more_lines", 2)]["va_valid"]  # the label stays without an image
    assert [f for v, f in r if v == "fewer_lines"] == [1, 2, 3, 4]
    assert not r[("fewer_lines", 3)]["va_valid"] and r[("fewer_lines", 3)]["has_image"]
    assert counts["missing_images"] == 3 and counts["images_without_line"] == 2
    assert counts["line_image_mismatches"] == 2
    v = {x["video"]: x for x in pq.read_table(tmp_path / "i" / "videos.parquet").to_pylist()}
    assert v["more_lines"]["lines_without_image"] == 3 and v["more_lines"]["mismatch"] == 3
    assert v["fewer_lines"]["images_without_line"] == 2 and v["fewer_lines"]["mismatch"] == -2


def test_split_rule_and_two_subject_videos(tmp_path):
    root = tmp_path / "t"
    write_task(root, "abaw6", "va", "train", "x", [[0.1, 0.1]])
    write_task(root, "abaw6", "au", "val", "x", [[0] * 12])  # val in AU -> val everywhere
    write_task(root, "abaw6", "va", "train", "y_left", [[0.1, 0.1]])
    write_task(root, "abaw6", "va", "val", "y_right", [[0.2, 0.2]])
    write_images(root, "y_left", [1])
    write_images(root, "y_right", [1])
    write_images(root, "z", [1])  # crops, no annotation, no test list: test (issue 11)
    counts, table, _ = index(root, tmp_path / "i")
    r = rows(table)
    assert r[("x", 1)]["split"] == "val" and r[("x", 1)]["va_valid"] and r[("x", 1)]["au_valid"]
    assert r[("y_left", 1)]["split"] == "train" and r[("y_right", 1)]["split"] == "val"
    assert r[("y_right", 1)]["image"] == "y_right/00001.jpg"
    assert r[("z", 1)]["split"] == "test" and not r[("z", 1)]["va_valid"]
    assert counts["split_conflicts"] == 1
    assert counts["splits"] == {"train": 1, "val": 2, "test": 1}


def test_images_option_overrides_search(tmp_path):
    root = tmp_path / "t"
    small_tree(root, "abaw6")
    counts, table, meta = index(root, tmp_path / "i", images=(root / "cropped_aligned",))
    assert [Path(p).name for p in meta["image_roots"]] == ["cropped_aligned"]
    assert not rows(table)[("b", 1)]["has_image"]  # b's images are in the other root


def test_odd_image_names_and_first_root_wins(tmp_path):
    root = tmp_path / "t"
    write_task(root, "abaw6", "va", "train", "a", [[0.1, 0.1]] * 2)
    (root / "cropped_aligned" / "a").mkdir(parents=True)
    (root / "cropped_aligned" / "a" / "1.jpg").write_bytes(b"x")
    (root / "cropped_aligned" / "a" / "notes.txt").write_text("x")
    write_images(root, "a", [1, 2], "cropped_aligned_new_50_vids")
    counts, table, _ = index(root, tmp_path / "i")
    r = rows(table)
    assert r[("a", 1)]["image"] == "a/1.jpg" and r[("a", 1)]["image_root"] == 0
    assert r[("a", 2)]["image"] == "a/00002.jpg" and r[("a", 2)]["image_root"] == 1
    assert counts["duplicate_images"] == 1


def test_malformed_file_stops_or_is_skipped(tmp_path):
    root = tmp_path / "t"
    small_tree(root, "abaw6")
    bad = write_task(root, "abaw6", "expr", "val", "b", [[1], [9], [2]])
    with pytest.raises(ValueError, match=f"{bad}:3: value out of range"):
        build_index(IndexConfig(root=root, out=tmp_path / "i"))
    counts, table, _ = index(root, tmp_path / "i", on_bad_line="skip")
    assert counts["bad_lines"] == 1 and counts["bad_line_locations"] == [f"{bad}:3"]
    r = rows(table)
    assert r[("b", 1)]["expr"] == 1 and r[("b", 2)]["expr"] == -1 and r[("b", 3)]["expr"] == 2


def test_same_video_twice_in_a_task_is_an_error(tmp_path):
    root = tmp_path / "t"
    write_task(root, "abaw6", "va", "train", "a", [[0.1, 0.1]])
    write_task(root, "abaw6", "va", "val", "a", [[0.1, 0.1]])
    with pytest.raises(ValueError, match="a has two VA files"):
        build_index(IndexConfig(root=root, out=tmp_path / "i"))


def test_no_annotations_and_no_images_is_an_error(tmp_path):
    (tmp_path / "t" / "notes").mkdir(parents=True)
    with pytest.raises(ValueError, match="no challenge folders .*no image root"):
        build_index(IndexConfig(root=tmp_path / "t", out=tmp_path / "i"))
    assert not (tmp_path / "i").exists()


def test_images_without_annotations_are_test_videos(tmp_path):
    """A tree of crops alone (affpipe crop's) indexes: every video test, the summary says why."""
    from affpipe.index.build import format_summary

    write_images(tmp_path / "t" / "cropped_aligned", "a", [1, 2])
    counts = build_index(IndexConfig(root=tmp_path / "t", out=tmp_path / "i"))
    assert counts["splits"]["test"] == 2 and counts["annotations"] is False
    assert "no annotation files" in format_summary(counts)


MTL_HEADER = "image,valence,arousal,expression," + ",".join(AU_NAMES)
AU_ROW = ",".join(["1", "0"] * 6)


def test_mtl_table_duplicates_collapsed(tmp_path):
    root = tmp_path / "t"
    small_tree(root, "abaw6")
    mtl = root / "MTL_Challenge"
    mtl.mkdir()
    (mtl / "train_set.txt").write_text("\n".join([
        MTL_HEADER, f"a/00002.jpg,0.1,0.2,3,{AU_ROW}", f"a/00001.jpg,0.5,0.5,1,{AU_ROW}",
        f"a/00002.jpg,0.1,0.2,3,{AU_ROW}", f"a/00009.jpg,-5,-5,-1,{AU_ROW}"]) + "\n")
    (mtl / "validation_set.txt").write_text(f"{MTL_HEADER}\nb/00001.jpg,0.3,0.3,7,{AU_ROW}\n")
    counts, _, meta = index(root, tmp_path / "i")
    table, _ = load_index(tmp_path / "i", table="mtl")
    assert table.schema == FRAMES_SCHEMA
    assert counts["mtl"]["duplicates_collapsed"] == 1 and counts["mtl"]["rows"] == 4
    assert table.column("row_id").to_pylist() == [0, 1, 2, 3]
    r = rows(table)
    assert list(r) == [("a", 1), ("a", 2), ("a", 9), ("b", 1)]
    assert r[("a", 2)]["expr"] == 3 and r[("a", 2)]["has_image"] and r[("a", 2)]["image"] == "a/00002.jpg"
    assert not r[("a", 9)]["has_image"] and not r[("a", 9)]["va_valid"]
    assert r[("b", 1)]["split"] == "val" and r[("b", 1)]["image_root"] == 1
    assert [p.name for p in map(Path, meta["layouts"]["mtl_files"].values())] == ["train_set.txt", "validation_set.txt"]


def test_mtl_conflicting_duplicates_name_both_lines(tmp_path):
    root = tmp_path / "t"
    small_tree(root, "abaw6")
    f = root / "training_set_annotations.txt"
    f.write_text(f"{MTL_HEADER}\na/00001.jpg,0.1,0.2,3,{AU_ROW}\na/00003.jpg,0,0,0,{AU_ROW}\n"
                 f"a/00001.jpg,0.1,0.2,4,{AU_ROW}\n")
    with pytest.raises(ValueError, match=f"{f}:2 and {f}:4: conflicting duplicate"):
        build_index(IndexConfig(root=root, out=tmp_path / "i"))


def test_process_pool_matches_serial(tmp_path, monkeypatch):
    root = tmp_path / "t"
    for k in range(6):
        write_task(root, "abaw6", "va", "val" if k % 3 == 0 else "train", f"v{k}", [[k / 10, 0.1]] * (k + 1))
        write_images(root, f"v{k}", range(1, k + 3))
    _, serial, _ = index(root, tmp_path / "s", workers=1)
    monkeypatch.setattr(index_mod, "_POOL_MIN_VIDEOS", 1)
    _, pooled, _ = index(root, tmp_path / "p", workers=2)
    assert pooled.num_rows == 27
    assert repr(pooled.to_pylist()) == repr(serial.to_pylist())  # repr: NaN == NaN


def test_load_index_errors(tmp_path):
    with pytest.raises(ValueError, match="not an index folder"):
        load_index(tmp_path)
    small_tree(tmp_path / "t", "abaw3")
    build_index(IndexConfig(root=tmp_path / "t", out=tmp_path / "i"))
    with pytest.raises(ValueError, match="no mtl_frames.parquet"):
        load_index(tmp_path / "i", table="mtl")
    with pytest.raises(ValueError, match="no image"):
        image_path(json.loads((tmp_path / "i" / "index.json").read_text()), -1, None)


def test_naive_baseline_agrees(tmp_path):
    from affpipe.bench.naive_index import compare_index, naive_index

    small_tree(tmp_path / "t", "abaw5")
    naive = naive_index(tmp_path / "t")
    assert naive.num_rows == 5
    res = compare_index(tmp_path / "t", workers=1)
    assert res["agree"] and res["frames"] == 5


def test_cli_index_and_stats(tmp_path):
    from affpipe.cli import main

    small_tree(tmp_path / "t", "abaw6")
    res = CliRunner().invoke(main, ["index", str(tmp_path / "t"), "-o", str(tmp_path / "i")])
    assert res.exit_code == 0, res.output
    assert "5 frames of 2 videos" in res.output and "missing images" in res.output
    assert (tmp_path / "i" / "frames.parquet").is_file()
    write_task(tmp_path / "t", "abaw6", "au", "val", "b", ["1,0"])
    res = CliRunner().invoke(main, ["index", str(tmp_path / "t"), "-o", str(tmp_path / "j")])
    assert res.exit_code != 0 and "b.txt:2: expected 12 column(s), got 2" in res.output


# --- index == synth truth (needs affpipe.synth.generate) ---------------------------------------------

_TRUTH_COLS = ["video", "frame", "split", "has_image", "valence", "arousal", "expr", *AU_NAMES]


def _compare_truth(table: pa.Table, truth: pa.Table) -> None:
    # The contract: one row per frame with a line or an image. (synth's truth can also list a
    # frame with neither, which no index can see; those rows are not compared.)
    seen = truth.column("has_image").to_numpy()
    for t in ("va", "expr", "au"):
        seen = seen | truth.column(f"{t}_annot").to_numpy()
    truth = truth.filter(pa.array(seen)).sort_by([("video", "ascending"), ("frame", "ascending")])
    assert table.num_rows == truth.num_rows
    for c in _TRUTH_COLS:
        got, want = table.column(c).to_numpy(zero_copy_only=False), truth.column(c).to_numpy(zero_copy_only=False)
        if c in ("valence", "arousal"):
            np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32), err_msg=c)
        else:
            assert (got == want).all(), c
    va_annot = truth.column("va_annot").to_numpy()
    assert not table.column("va_valid").to_numpy()[~va_annot].any()
    assert table.column("image").to_pylist() == truth.column("image").to_pylist()


def _image_dirs(table: pa.Table, meta: dict) -> list:
    names = [Path(p).name for p in meta["image_roots"]]
    return [names[r] if r >= 0 else None for r in table.column("image_root").to_pylist()]


def test_index_equals_synth_truth(index_dir, synth_tree):
    table, meta = load_index(index_dir)
    truth = pq.read_table(synth_tree / "synth_truth.parquet")
    _compare_truth(table, truth)
    assert len(meta["image_roots"]) == 2
    assert _image_dirs(table, meta) == truth.column("image_dir").to_pylist()


@pytest.mark.parametrize("layout", ["abaw1", "abaw2", "abaw3", "abaw5"])
def test_index_equals_synth_truth_other_editions(tmp_path, layout):
    """Every edition's twin, with test videos (ABAW1-2: no list, the crops-only rule; ABAW3+: the
    TestSet/ lists), indexes to its truth, the split column ("test" included) too."""
    from affpipe.synth.generate import SynthConfig, generate

    generate(SynthConfig(out=tmp_path / "s", layout=layout, videos=8, frames=40, seed=1, mtl=True, test_videos=2))
    counts = build_index(IndexConfig(root=tmp_path / "s", out=tmp_path / "i"))
    table, meta = load_index(tmp_path / "i")
    truth = pq.read_table(tmp_path / "s" / "synth_truth.parquet")
    _compare_truth(table, truth)
    assert _image_dirs(table, meta) == truth.column("image_dir").to_pylist()
    _compare_truth(load_index(tmp_path / "i", table="mtl")[0], pq.read_table(tmp_path / "s" / "synth_truth_mtl.parquet"))
    assert counts["split_conflicts"] == 1  # synth's cross-split video
    assert counts["mtl"]["duplicates_collapsed"] >= 1
    assert counts["test"]["videos"] == 2 and counts["splits"]["test"] > 0
    assert counts["test"]["rule"].startswith("test lists" if layout in ("abaw3", "abaw5") else "crops")
    if layout == "abaw1":  # the 2020 naming and 8-AU header: nothing lost, AU20 reported
        assert counts["tasks"]["va"]["train"]["files"] > 0
        assert counts["unused_columns"]["au:AU20"]["rows"] == counts["tasks"]["au"]["train"]["lines"] + \
            counts["tasks"]["au"]["val"]["lines"]


def test_mtl_index_equals_synth_truth(index_dir, synth_tree):
    table, _ = load_index(index_dir, table="mtl")
    _compare_truth(table, pq.read_table(synth_tree / "synth_truth_mtl.parquet"))
