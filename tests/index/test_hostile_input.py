"""Issue 12, index stage: hostile names (2), no images (8), huge frame numbers (14), symlink
loops, unreadable folders, non-UTF-8 names and huge lines (15)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from affpipe.index.build import IndexConfig, build_index


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    from affpipe.synth.generate import SynthConfig, generate

    root = tmp_path_factory.mktemp("i12tree") / "affwild2"
    generate(SynthConfig(out=root, layout="abaw6", videos=3, frames=20, seed=0, mtl=True))
    return root


@pytest.fixture
def tree(small_tree, tmp_path) -> Path:
    root = tmp_path / "tree"
    shutil.copytree(small_tree, root, symlinks=True)
    return root


def _mtl_train(root: Path) -> Path:
    return next(root.rglob("MTL_Challenge")) / "train_set.txt"


def _index(root: Path, out: Path, **kw) -> dict:
    return build_index(IndexConfig(root=root, out=out, workers=1, **kw))


@pytest.mark.parametrize("row", ["../../../x/00003.jpg", "/tmp/x/00002.jpg", "a/../../b/00001.jpg"])
def test_mtl_row_with_a_path_as_video_is_refused_with_file_line(tree, tmp_path, row):
    mtl = _mtl_train(tree)
    lines = mtl.read_text().splitlines()
    lines.insert(3, row + ",0.1,0.2,3,0,0,0,0,0,0,0,0,0,0,0,0")
    mtl.write_text("\n".join(lines) + "\n")
    out = tmp_path / "index"
    with pytest.raises(ValueError, match=r"train_set\.txt:4: bad image path .*plain name"):
        _index(tree, out)
    assert not out.exists()  # refused before anything was written


def test_hostile_annotation_and_image_folder_names_are_refused(tree, tmp_path):
    va = next(tree.rglob("VA_Estimation_Challenge")) / "Train_Set"
    victim = next(va.glob("*.txt"))
    shutil.copy(victim, va / "a\\..\\b.txt")  # a Windows-style path as a video name
    with pytest.raises(ValueError, match=r"name 'a\\\\\.\.\\\\b' contains a path separator"):
        _index(tree, tmp_path / "i1")
    (va / "a\\..\\b.txt").unlink()
    bad = os.fsencode(tree / "cropped_aligned") + b"/vid\xff\xfe"
    os.mkdir(bad)
    for f in (tree / "cropped_aligned").iterdir():
        if f.is_dir() and os.fsencode(f) != bad:
            shutil.copy(next(f.glob("*.jpg")), os.fsdecode(bad + b"/00001.jpg"))
            break
    with pytest.raises(ValueError, match="not valid UTF-8"):
        _index(tree, tmp_path / "i2")


def test_wrong_images_folder_is_an_error(tree, tmp_path):
    empty = tmp_path / "not-the-crops"
    (empty / "somevideo").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no frame image found for any of the \d+ annotated videos.*--images"):
        _index(tree, tmp_path / "index", images=(empty,))
    assert not (tmp_path / "index" / "frames.parquet").exists()


@pytest.mark.parametrize("name", ["3000000000.jpg", "12345678901234567890.jpg"])
def test_huge_frame_number_is_an_error_naming_the_file(tree, tmp_path, name):
    video = next(p for p in (tree / "cropped_aligned").iterdir() if p.is_dir())
    shutil.copy(next(video.glob("*.jpg")), video / name)
    with pytest.raises(ValueError, match=rf"{video.name}/{name[:-4]}\.jpg: frame number .* beyond 10,000,000"):
        _index(tree, tmp_path / "index")


def test_huge_frame_number_in_mtl_file(tree, tmp_path):
    mtl = _mtl_train(tree)
    video = mtl.read_text().splitlines()[1].split("/")[0]
    with open(mtl, "a") as f:
        f.write(f"{video}/99999999999999999999.jpg,0.1,0.2,3,0,0,0,0,0,0,0,0,0,0,0,0\n")
    with pytest.raises(ValueError, match=r"train_set\.txt:\d+: frame number .* beyond"):
        _index(tree, tmp_path / "index")


def test_symlink_loop_is_named_as_a_loop(tree, tmp_path):
    ann = next(tree.glob("*Annotations*"))
    os.symlink("..", ann / "loop")
    with pytest.raises(ValueError, match=r"symlink loop"):
        _index(tree, tmp_path / "index")


def test_symlinked_alias_is_entered_once(tree, tmp_path):
    ann = next(tree.glob("*Annotations*"))
    os.symlink(ann, tree / "alias")  # the same challenge folders reached twice: no "4 VA folders"
    counts = _index(tree, tmp_path / "index")
    assert counts["videos"] == 3


def test_unreadable_folder_is_named(tree, tmp_path, monkeypatch):
    ann = next(tree.glob("*Annotations*"))
    real = os.scandir

    def scandir(path="."):  # we run as root in CI: chmod 000 would not stop us, so simulate it
        if Path(path) == ann:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermissionError, match="cannot list this folder") as err:
        _index(tree, tmp_path / "index")
    assert err.value.filename == str(ann)


def test_huge_line_is_cut_in_the_message(tree, tmp_path):
    va = next(tree.rglob("VA_Estimation_Challenge")) / "Train_Set"
    victim = next(va.glob("*.txt"))
    lines = victim.read_text().splitlines()
    lines[2] = "0.5," + "x" * 20_000_000
    victim.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        _index(tree, tmp_path / "index")
    msg = str(err.value)
    assert f"{victim.name}:3: non-numeric value" in msg and "20000000 characters" in msg and len(msg) < 600


# ---- issue 24: a name that would split a line of a submission ------------------------------


@pytest.mark.parametrize("where", ["annotation file", "image folder"])
def test_a_video_name_holding_a_newline_is_refused_where_it_enters(tree, tmp_path, where):
    if where == "annotation file":
        va = next(tree.rglob("VA_Estimation_Challenge")) / "Train_Set"
        shutil.copy(next(va.glob("*.txt")), va / "evil\nvideo.txt")
    else:
        video = next(p for p in (tree / "cropped_aligned").iterdir() if p.is_dir())
        (tree / "cropped_aligned" / "evil\nvideo").mkdir()
        shutil.copy(next(video.glob("*.jpg")), tree / "cropped_aligned" / "evil\nvideo" / "00001.jpg")
    with pytest.raises(ValueError, match=r"name 'evil\\nvideo' contains a control character"):
        _index(tree, tmp_path / "index")
    assert not (tmp_path / "index" / "frames.parquet").exists()


@pytest.mark.parametrize("name", ["a\tb", "a\rb", "a\x7fb", "..", ".", "a/b", "a\0b", "x" * 256])
def test_the_one_safe_name_check(name):
    from affpipe.io import is_safe_name

    assert not is_safe_name(name) and is_safe_name("video_12-left.v2")
