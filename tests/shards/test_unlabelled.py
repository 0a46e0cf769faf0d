"""Unlabelled frames in shards of their own: written by default, marked, never seen by supervised
loaders; 0.3 shards (none of them) still load and say so; edited manifests are caught."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from support import make_index

from affpipe.labels import FLAG_VA, RECORD_SIZE, decode_records
from affpipe.loaders import make_loader
from affpipe.shards import verify_shards
from affpipe.shards.format import read_manifest, shard_paths
from affpipe.shards.unlabelled import (
    frame_counts,
    pretrain_fingerprint,
    pretrain_shard_paths,
    unlabelled_note,
)
from affpipe.shards.write import ShardConfig, write_shards


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    return make_index(tmp_path_factory.mktemp("u"), videos=6, frames=40)


@pytest.fixture(scope="module")
def both(index, tmp_path_factory) -> tuple[Path, Path]:
    """The same index sharded with (the default) and without unlabelled frames."""
    root = tmp_path_factory.mktemp("s")
    with_u, without = root / "with", root / "without"
    for out, flag in ((with_u, True), (without, False)):
        write_shards(ShardConfig(index=index, out=out, samples_per_shard=23, workers=1, seed=2, unlabelled=flag))
    return with_u, without


def _members(tar: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def test_unlabelled_frames_are_written_apart_and_marked(both):
    with_u, without = both
    m = read_manifest(with_u)
    for split in ("train", "val"):
        info = m["splits"][split]
        assert info["unlabelled"]["samples"] > 0 and info["skipped"]["no_label"] == 0
        assert info["counts"] == {"labelled": info["samples"], "unlabelled": info["unlabelled"]["samples"]}
        assert read_manifest(without)["splits"][split]["skipped"]["no_label"] == info["unlabelled"]["samples"]
        for tar, _ in pretrain_shard_paths(with_u, split)[len(shard_paths(with_u, split)):]:
            assert tar.name.startswith(f"{split}-unlabelled-")
            records = decode_records(b"".join(data for name, data in _members(tar) if name.endswith(".lbl")))
            assert len(records) and (records["flags"] == 0).all()  # no label reaches a head from them
    assert verify_shards(with_u, decode=True) == [] and verify_shards(without) == []


def test_supervised_data_is_unchanged_by_the_unlabelled_shards(both):
    with_u, without = both
    for split in ("train", "val"):  # the labelled shards are the same bytes, listed the same way
        a, b = shard_paths(with_u, split), shard_paths(without, split)
        assert [t.name for t, _ in a] == [t.name for t, _ in b]
        assert all(ta.read_bytes() == tb.read_bytes() and ia.read_bytes() == ib.read_bytes()
                   for (ta, ia), (tb, ib) in zip(a, b, strict=True))
    assert read_manifest(with_u)["fingerprint"] == read_manifest(without)["fingerprint"]
    assert pretrain_fingerprint(read_manifest(with_u)) != pretrain_fingerprint(read_manifest(without))
    for train in (True, False):  # same batches for the same seed, through a supervised loader
        batches = []
        for out in (with_u, without):
            loader = make_loader(out, "train" if train else "val", batch_size=8, train=train, backend="torch",
                                 num_workers=2, seed=5, normalize=False)
            loader.set_epoch(1)
            batches.append([(b.images.clone(), b.row_id.clone(), b.va.clone(), b.au_mask.clone()) for b in loader])
            if hasattr(loader, "close"):
                loader.close()
        assert len(batches[0]) == len(batches[1]) > 0
        for x, y in zip(*batches, strict=True):
            assert all(torch.equal(p, q) for p, q in zip(x, y, strict=True))


def _as_03(src: Path, dst: Path) -> Path:
    """A copy of ``src`` (written without unlabelled frames) as affpipe 0.3 wrote it: no
    ``unlabelled`` option, no ``counts``."""
    import shutil

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["options"].pop("unlabelled")
    for info in m["splits"].values():
        info.pop("counts")
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_03_shards_load_and_are_reported_as_holding_none(both, tmp_path):
    old = _as_03(both[1], tmp_path / "old")
    assert frame_counts(old)["train"]["unlabelled"] == 0
    note = unlabelled_note(old, ("train",))
    assert note is not None and "hold no unlabelled frames" in note and "0.3" in note
    assert "--no-unlabelled" in unlabelled_note(both[1])
    assert unlabelled_note(both[0], ("train",)) is None
    loader = make_loader(old, "train", batch_size=8, train=True, backend="torch", num_workers=0)
    assert len(list(loader)) == len(loader) > 0
    assert verify_shards(old) == []


def test_edited_counts_are_refused_naming_the_key(both, tmp_path):
    import shutil

    for key, edit in (("counts.unlabelled", lambda i: i["counts"].update(unlabelled=i["counts"]["unlabelled"] + 5)),
                      ("unlabelled.samples", lambda i: i["unlabelled"].update(samples=0))):
        out = tmp_path / key
        shutil.copytree(both[0], out)
        m = json.loads((out / "manifest.json").read_text())
        edit(m["splits"]["train"])
        (out / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ValueError, match=f"splits.train.{key}"):
            frame_counts(out)
        assert any("unlabelled" in p for p in verify_shards(out))


def test_an_unlabelled_record_carrying_a_label_is_found_by_verify(both, tmp_path):
    import shutil

    out = tmp_path / "t"
    shutil.copytree(both[0], out)
    tar = pretrain_shard_paths(out, "train")[-1][0]
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as tf:
        lbl = next(m for m in tf.getmembers() if m.name.endswith(".lbl"))
    rec = np.frombuffer(bytes(data[lbl.offset_data:lbl.offset_data + RECORD_SIZE]), np.uint8).copy()
    rec[29] |= FLAG_VA  # the mask bit set, a label "present" in a frame written as unlabelled
    rec[8:16] = np.frombuffer(np.array([0.5, 0.5], "<f4").tobytes(), np.uint8)
    data[lbl.offset_data:lbl.offset_data + RECORD_SIZE] = rec.tobytes()
    tar.write_bytes(bytes(data))
    problems = verify_shards(out)
    assert any("label record differs" in p and tar.name in p for p in problems)


def test_unlabelled_shards_are_ours_to_remove(index, tmp_path):
    out = tmp_path / "r"
    write_shards(ShardConfig(index=index, out=out, split="val", samples_per_shard=5, workers=1))
    many = sorted(p.name for p in (out / "val").glob("val-unlabelled-*.tar"))
    with pytest.raises(FileExistsError, match="unlabelled: True .in the folder. vs False .now.*--overwrite"):
        write_shards(ShardConfig(index=index, out=out, split="val", samples_per_shard=1000, workers=1, unlabelled=False))
    assert sorted(p.name for p in (out / "val").glob("val-unlabelled-*.tar")) == many  # nothing deleted unasked
    write_shards(ShardConfig(index=index, out=out, split="val", samples_per_shard=1000, workers=1, unlabelled=False,
                             overwrite=True))
    assert len(many) > 1 and not list((out / "val").glob("val-unlabelled-*"))
    assert "unlabelled" not in read_manifest(out)["splits"]["val"] and verify_shards(out) == []


def test_adding_the_unlabelled_shards_keeps_the_labelled_ones(index, tmp_path):
    out = tmp_path / "grow"
    write_shards(ShardConfig(index=index, out=out, split="train", samples_per_shard=23, workers=1, unlabelled=False))
    before = {t: t.stat().st_mtime_ns for t, _ in shard_paths(out, "train")}
    manifest = write_shards(ShardConfig(index=index, out=out, split="train", samples_per_shard=23, workers=1))
    assert {t: t.stat().st_mtime_ns for t, _ in shard_paths(out, "train")} == before  # resumed, not rewritten
    assert manifest["splits"]["train"]["unlabelled"]["samples"] > 0 and verify_shards(out) == []
