"""Tests of affpipe.shards.verify: every kind of damage is caught with a message naming shard and key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import make_index

from affpipe.labels import RECORD_SIZE, decode_records
from affpipe.shards import ShardConfig, shard_paths, verify_shards, write_shards
from affpipe.shards.format import parse_tar


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vtree")
    index = make_index(root, videos=4, frames=20, seed=1)
    out = root / "shards"
    write_shards(ShardConfig(index=index, out=out, samples_per_shard=10, workers=1, seed=0))
    assert verify_shards(out, decode=True) == []
    return index, out


@pytest.fixture
def shards(pristine, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(pristine[1], out)
    return out


def _members(tar: Path) -> list[tuple[str, int, int]]:
    members, err = parse_tar(tar.read_bytes())
    assert err is None
    return members


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_flipped_image_byte_is_caught(shards):
    tar, _ = shard_paths(shards, "train")[1]
    name, off, size = _members(tar)[2]
    _patch(tar, off + size // 2, bytes([tar.read_bytes()[off + size // 2] ^ 0xFF]))
    problems = verify_shards(shards)
    assert any(p.startswith("train/train-000001.tar: sha256") for p in problems), problems


def test_truncated_shard_is_caught(shards):
    tar, _ = shard_paths(shards, "val")[0]
    with open(tar, "r+b") as f:
        f.truncate(tar.stat().st_size // 2)
    problems = verify_shards(shards)
    text = "\n".join(problems)
    assert "val/val-000000.tar: size" in text and "truncated" in text and "samples in the tar" in text


def test_tampered_label_is_caught(shards):
    tar, _ = shard_paths(shards, "train")[0]
    name, off, _ = _members(tar)[7]  # the 4th sample's .lbl
    rec = decode_records(tar.read_bytes()[off:off + RECORD_SIZE]).copy()
    rec["expr"] = (rec["expr"] + 1) % 8
    _patch(tar, off, rec.tobytes())
    problems = verify_shards(shards)
    key = name[:-4]
    assert any(f"train/train-000000.tar: key {key}: label record differs" in p and "expr" in p for p in problems), problems


def test_label_swapped_between_rows_is_caught(shards):
    """A record that is valid on its own but belongs to another row (row_id != key)."""
    tar, _ = shard_paths(shards, "val")[0]
    m = _members(tar)
    a, b = m[1], m[3]
    data = tar.read_bytes()
    _patch(tar, a[1], data[b[1]:b[1] + RECORD_SIZE])
    problems = verify_shards(shards)
    assert any(f"key {a[0][:-4]}: .lbl row_id {int(b[0][:-4])} != key" in p for p in problems), problems


def test_wrong_idx_offset_is_caught(shards):
    _, idx = shard_paths(shards, "train")[0]
    lines = idx.read_text().splitlines(keepends=True)
    parts = lines[2].split(" ")
    parts[1] = str(int(parts[1]) + 512)
    lines[2] = " ".join(parts)
    idx.write_text("".join(lines))
    problems = verify_shards(shards)
    assert any("train-000000.idx: key" in p and parts[3] in p for p in problems), problems


def test_undecodable_jpeg_needs_decode(shards):
    tar, _ = shard_paths(shards, "val")[0]
    name, off, size = _members(tar)[4]
    _patch(tar, off, bytes(size))  # zeros: not a JPEG any more
    assert not any("does not decode" in p for p in verify_shards(shards))
    assert any(f"key {name[:-4]}: the JPEG does not decode" in p for p in verify_shards(shards, decode=True))


def test_changed_label_table_and_missing_index(shards, pristine, tmp_path):
    import pyarrow.parquet as pq

    index = tmp_path / "index"
    shutil.copytree(pristine[0], index)
    tbl = pq.read_table(index / "frames.parquet")
    valence = tbl["valence"].to_numpy(zero_copy_only=False).copy()
    target = int(np.nonzero(tbl["va_valid"].to_numpy(zero_copy_only=False) & tbl["has_image"].to_numpy(zero_copy_only=False))[0][0])
    valence[target] += 0.25
    pq.write_table(tbl.set_column(tbl.schema.get_field_index("valence"), "valence", [valence]), index / "frames.parquet")
    problems = verify_shards(shards, index=index)
    assert any(f"key {target:010d}: label record differs from the table: valence" in p for p in problems), problems
    # Without a reachable index the label checks cannot run: that is reported, not passed.
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["index"] = manifest["index_absolute"] = str(tmp_path / "gone")
    (shards / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_shards(shards)
    assert len(problems) == 1 and "not checked" in problems[0]


def test_missing_shard_and_count_mismatch(shards):
    tar, _ = shard_paths(shards, "train")[-1]
    tar.unlink()
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["samples"] += 1
    (shards / "manifest.json").write_text(json.dumps(manifest))
    text = "\n".join(verify_shards(shards))
    assert f"train/{tar.name}: missing" in text
    assert "val/val-000000.tar:" in text and "!= manifest" in text and "do not add up" in text
