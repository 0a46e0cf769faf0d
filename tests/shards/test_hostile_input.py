"""Issue 12, shard stage: confined manifest paths (3), never deleting the user's files and one
writer per folder (5), off-size frames (7), empty splits (8), zero-byte JPEGs (10), malformed
manifests and indexes (15), a moved index (13)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from affpipe.shards import ShardConfig, read_manifest, verify_shards, write_shards


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """(synthetic tree, its index): 3 videos x 20 frames."""
    from affpipe.index.build import IndexConfig, build_index
    from affpipe.synth.generate import SynthConfig, generate

    base = tmp_path_factory.mktemp("i12shards")
    generate(SynthConfig(out=base / "tree", layout="abaw6", videos=3, frames=20, seed=0))
    build_index(IndexConfig(root=base / "tree", out=base / "index", workers=1))
    return base / "tree", base / "index"


@pytest.fixture
def data(small, tmp_path) -> tuple[Path, Path]:
    """A private copy (tree + index side by side) for tests that damage it."""
    shutil.copytree(small[0], tmp_path / "tree")
    shutil.copytree(small[1], tmp_path / "index")
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    meta["image_roots"] = [r.replace(str(small[0]), str(tmp_path / "tree")) for r in meta["image_roots"]]
    (tmp_path / "index" / "index.json").write_text(json.dumps(meta))
    return tmp_path / "tree", tmp_path / "index"


def _shard(index: Path, out: Path, **kw) -> dict:
    return write_shards(ShardConfig(index=index, out=out, samples_per_shard=100, workers=1, **kw))


@pytest.fixture(scope="module")
def shards(small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("i12s") / "shards"
    _shard(small[1], out)
    return out


def _frames(index: Path, split: str = "train") -> list[Path]:
    from affpipe.index.build import load_index

    tbl, meta = load_index(index)
    return [Path(meta["image_roots"][r]) / img for r, img, s in
            zip(tbl["image_root"].to_pylist(), tbl["image"].to_pylist(), tbl["split"].to_pylist(), strict=True)
            if img is not None and s == split]


# ---- 3: manifest paths --------------------------------------------------------------------


@pytest.mark.parametrize("hostile", ["../../../../etc/passwd", "/etc/passwd", "train/../../x.tar"])
@pytest.mark.parametrize("key", ["file", "index_file"])
def test_manifest_paths_outside_the_folder_are_refused(shards, tmp_path, hostile, key):
    from affpipe.loaders import make_loader

    out = tmp_path / "s"
    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0][key] = hostile
    (out / "manifest.json").write_text(json.dumps(manifest))
    pattern = rf"manifest\.json: splits\.train\.shards\[0\]\.{key}: path .* (not a relative path inside|leads outside)"
    with pytest.raises(ValueError, match=pattern):
        verify_shards(out)
    with pytest.raises(ValueError, match=pattern):
        make_loader(out, "train", batch_size=4, train=False, backend="torch", num_workers=0)


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.pop("splits"), "missing key splits"),
    (lambda m: m["splits"]["train"]["shards"][0].pop("sha256"), r"missing key splits\.train\.shards\[0\]\.sha256"),
    (lambda m: m["splits"]["val"].update(samples="12"), r"splits\.val\.samples must be int"),
    (lambda m: m["options"].update(samples_per_shard=0), "samples_per_shard must be >= 1"),
    (lambda m: m["splits"].update(evil={"shards": []}), "unknown split 'evil'"),
])
def test_malformed_manifest_is_named(shards, tmp_path, damage, message):
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    damage(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message):
        verify_shards(out)


def test_manifest_that_is_not_json(shards, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    (out / "manifest.json").write_text('{"schema_version": 1,\n "splits": {,\n}')
    with pytest.raises(ValueError, match=r"manifest\.json:2: not valid JSON"):
        verify_shards(out)
    (out / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not a manifest"):
        verify_shards(out)


def test_garbage_idx_and_tar_header_are_problems_not_crashes(shards, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    idx = next((out / "train").glob("*.idx"))
    idx.write_bytes(bytes(range(256)) * 8)
    tar = next((out / "val").glob("*.tar"))
    data = bytearray(tar.read_bytes())
    data[124:136] = b"zzzzzzzzzzz\0"  # the size field, with a checksum that matches it
    data[148:156] = b" " * 8
    data[148:155] = b"%06o\0" % sum(data[:512])
    tar.write_bytes(bytes(data))
    text = "\n".join(verify_shards(out))
    assert f"{idx.name}: first line" in text and "non-numeric size field" in text


# ---- 5: the user's files ------------------------------------------------------------------


def test_shard_never_deletes_files_it_did_not_write(small, tmp_path):
    out = tmp_path / "shards"
    _shard(small[1], out)
    notes = [out / "train" / "train-notes.txt", out / "val" / "val-2023-results.csv", out / "README"]
    for p in notes:
        p.write_text("mine\n")
    with pytest.raises(FileExistsError, match=r"holds files affpipe did not write \(README, train/train-notes\.txt, "
                                              r"val/val-2023-results\.csv\)"):
        _shard(small[1], out)
    assert all(p.read_text() == "mine\n" for p in notes)


def test_shard_refuses_a_foreign_folder(small, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"not empty and not a shard folder of affpipe \(holds holiday\.jpg\)"):
        _shard(small[1], out)
    assert (out / "holiday.jpg").read_bytes() == b"x" and sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


def test_stale_shards_of_ours_are_still_removed(small, tmp_path):
    out = tmp_path / "shards"
    _shard(small[1], out, )
    extra = out / "train" / "train-000009.tar"
    extra.write_bytes(b"old run")
    (out / "train" / "train-000000.tar.tmp").write_bytes(b"killed run")
    _shard(small[1], out)
    assert not extra.exists() and not (out / "train" / "train-000000.tar.tmp").exists()
    assert verify_shards(out) == []


def test_second_writer_finds_the_folder_busy(small, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "shards"
    (out / ".state").mkdir(parents=True)
    with open(out / ".lock", "a+") as fh:  # another `affpipe shard` holding the folder
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        fh.write("4242\n")
        fh.flush()
        with pytest.raises(FileExistsError, match=r"busy: another `affpipe shard` \(pid 4242\)"):
            _shard(small[1], out)
    _shard(small[1], out)  # released (as a killed holder's lock is): the folder is usable again


# ---- 7, 8, 10: frames ---------------------------------------------------------------------


def test_off_size_frame_is_refused_or_resized_on_purpose(data, tmp_path):
    _, index = data
    victim = _frames(index)[5]
    cv2.imwrite(str(victim), np.full((200, 300, 3), 90, np.uint8))
    with pytest.raises(ValueError, match=rf"{victim.name}: frame is 300x200, the shards hold 112x112 frames.*--resize-off-size"):
        _shard(index, tmp_path / "refused")
    manifest = _shard(index, tmp_path / "resized", resize_off_size=True)
    assert manifest["splits"]["train"]["resized"] == 1
    assert manifest["splits"]["train"]["frame_size"] == [112, 112]
    assert verify_shards(tmp_path / "resized", decode=True) == []


def test_zero_byte_and_non_jpeg_frames_are_skipped_and_counted(data, tmp_path):
    _, index = data
    empty, text = _frames(index)[3], _frames(index, "val")[2]
    empty.write_bytes(b"")
    text.write_text("not an image\n")
    manifest = _shard(index, tmp_path / "s")
    assert manifest["splits"]["train"]["skipped"]["bad_image"] == 1
    assert manifest["splits"]["val"]["skipped"]["bad_image"] == 1
    assert [b["why"] for b in manifest["splits"]["train"]["bad_images"]] == ["empty file"]
    assert manifest["splits"]["train"]["bad_images"][0]["image"] == str(empty)
    assert verify_shards(tmp_path / "s", decode=True) == []


def test_directory_named_like_a_frame_is_named(data, tmp_path):
    _, index = data
    victim = _frames(index)[4]
    victim.unlink()
    victim.mkdir()
    with pytest.raises(IsADirectoryError) as err:
        _shard(index, tmp_path / "s")
    assert err.value.filename == str(victim)


def test_split_without_any_image_is_an_error(data, tmp_path):
    from affpipe.index.build import IndexConfig, build_index

    tree, index = data
    for p in _frames(index, "val"):
        p.unlink()
    build_index(IndexConfig(root=tree, out=tmp_path / "reindexed", workers=1))
    with pytest.raises(ValueError, match=r"split 'val' gives 0 samples.*have no image.*--images"):
        _shard(tmp_path / "reindexed", tmp_path / "s")
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_verify_reports_an_empty_split(shards, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["val"].update(shards=[], samples=0, bytes=0)
    manifest["splits"]["val"]["skipped"]["no_image"] += 10
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert any("val: 0 samples" in p for p in verify_shards(out))


# ---- 13: moving shards with their index ---------------------------------------------------


def test_index_beside_the_shards_moves_with_them(small, tmp_path):
    from affpipe.shards import manifest_index

    data = tmp_path / "data"
    shutil.copytree(small[1], data / "index")
    _shard(data / "index", data / "shards" / "tiny")
    manifest = read_manifest(data / "shards" / "tiny")
    assert manifest["index"] == "../../index"
    moved = tmp_path / "elsewhere"
    os.rename(data, moved)
    assert manifest_index(moved / "shards" / "tiny").resolve() == (moved / "index").resolve()
    assert verify_shards(moved / "shards" / "tiny") == []
    shutil.rmtree(moved / "index")
    with pytest.raises(FileNotFoundError, match="pass --index"):
        manifest_index(moved / "shards" / "tiny")


# ---- issue 24: symlinked split and state folders; a full disk ------------------------------


@pytest.mark.parametrize("folder", ["split", ".state"])
def test_a_symlinked_split_or_state_folder_is_refused_and_the_users_files_kept(small, tmp_path, folder):
    out = tmp_path / "shards"
    manifest = _shard(small[1], out)
    split = next(iter(manifest["splits"]))
    name = split if folder == "split" else ".state"
    user = tmp_path / "userS"
    user.mkdir()
    stale = f"{split}-000007.tar" if folder == "split" else f"{split}-000007.json"  # named as ours would be
    (user / stale).write_text("the user's\n")
    shutil.rmtree(out / name)
    os.symlink(user, out / name)
    with pytest.raises(FileExistsError, match=rf"{name} \(symlink\)"):
        _shard(small[1], out)
    assert sorted(p.name for p in user.iterdir()) == [stale] and (user / stale).read_text() == "the user's\n"


def test_a_symlink_deeper_in_a_split_folder_is_refused(small, tmp_path):
    out = tmp_path / "shards"
    manifest = _shard(small[1], out)
    split = next(iter(manifest["splits"]))
    (tmp_path / "elsewhere").write_text("x")
    os.symlink(tmp_path / "elsewhere", out / split / f"{split}-000009.tar")
    with pytest.raises(FileExistsError, match=rf"{split}/{split}-000009\.tar \(symlink\)"):
        _shard(small[1], out)
    assert (tmp_path / "elsewhere").read_text() == "x"


def test_a_full_disk_leaves_no_temporary_of_a_stopped_worker(small, tmp_path, monkeypatch):
    import errno

    import affpipe.shards.write as write_mod

    def stopped(spec):  # a worker stopped mid-shard (pool.terminate): its .tar.tmp stays behind
        spec.tar.with_name(spec.tar.name + ".tmp").write_bytes(b"")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(write_mod, "write_shard", stopped)
    with pytest.raises(OSError):
        _shard(small[1], tmp_path / "full")
    assert not list((tmp_path / "full").rglob("*.tmp"))


def test_a_full_disk_at_the_lock_names_the_lock_file(small, tmp_path, monkeypatch):
    import errno

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match=rf"^{tmp_path / 'full' / '.lock'}: disk full"):
        _shard(small[1], tmp_path / "full")


def test_a_val_shard_listed_under_train_is_never_read_as_train(shards, tmp_path):
    from affpipe.loaders import make_loader

    out = tmp_path / "s"
    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"].append(dict(manifest["splits"]["val"]["shards"][0]))
    (out / "manifest.json").write_text(json.dumps(manifest))
    pattern = r"splits\.train\.shards\[\d+\]\.file: 'val/val-000000\.tar' is not a train shard's name"
    with pytest.raises(ValueError, match=pattern):
        make_loader(out, "train", batch_size=4, train=False, backend="torch", num_workers=0)
    with pytest.raises(ValueError, match=pattern):
        verify_shards(out)


@pytest.mark.parametrize("rel, what", [("train/old/train-000001.tar", "file"), (".state/old/train-000001.json", "file"),
                                       ("train/old", "link to a folder"), (".state/train-000003.json", "link to a file"),
                                       ("notes/deep/a.txt", "file")])
def test_user_files_and_links_at_each_depth_of_a_shard_folder_are_refused_and_kept(small, tmp_path, rel, what):
    out = tmp_path / "shards"
    _shard(small[1], out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "train-000001.tar").write_text("the user's\n")
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    if what == "file":
        (out / rel).write_text("the user's\n")
    else:
        os.symlink(elsewhere if what == "link to a folder" else elsewhere / "train-000001.tar", out / rel)
    with pytest.raises(FileExistsError, match=re.escape(rel)):
        _shard(small[1], out, seed=1, overwrite=True)
    assert os.path.lexists(out / rel) and (elsewhere / "train-000001.tar").read_text() == "the user's\n"
    assert verify_shards(out) == []
