"""Issue 12, loaders: label records range-checked (6), off-size frames (7), zero-byte JPEGs (10),
DALI's bad-JPEG diagnosis (11: the batch's own samples, linear), garbage indexes (15) — in both
backends (and the torch backend's thread pool, its default)."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from affpipe.loaders import make_loader
from affpipe.shards.format import parse_idx

# "threads": the torch backend's default thread pool (its fast path hands bad batches to the
# careful per-sample path); "torch" with num_workers=0 runs that careful path directly.
BACKENDS = ["torch", "threads", pytest.param("dali", marks=pytest.mark.dali)]


@pytest.fixture
def copy(shard_dir, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    return out


def _val_shard(out: Path) -> tuple[Path, Path]:
    tar = sorted((out / "val").glob("*.tar"))[0]
    return tar, tar.with_suffix(".idx")


def _patch(tar: Path, offset: int, data: bytes) -> None:
    with open(tar, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _all(out: Path, backend: str, on_bad: str = "error", **kw):
    workers = 2 if backend == "threads" else 0
    loader = make_loader(out, "val", batch_size=16, train=False, backend="torch" if backend == "threads" else backend,
                         num_workers=workers, on_bad=on_bad, **kw)
    rows = [int(r) for b in loader for r in b.row_id]
    return loader, rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("field, flag, offset, value", [
    ("expression", 2, 28, np.int8(99).tobytes()),
    ("AU", 4, 16, np.int8(5).tobytes()),
    ("valence/arousal", 1, 8, np.float32(1e30).tobytes()),
])
def test_out_of_range_label_record_is_a_bad_sample(copy, backend, field, flag, offset, value):
    tar, idx = _val_shard(copy)
    comp = parse_idx(idx)[3]
    key = comp["lbl"][2].split(".")[0]
    rec = bytearray(tar.read_bytes()[comp["lbl"][0]:comp["lbl"][0] + 32])
    rec[29] |= flag  # the task's mask on, so the flipped value would be read
    rec[offset:offset + len(value)] = value
    _patch(tar, comp["lbl"][0], bytes(rec))
    with pytest.raises(ValueError, match=rf"{tar.name}: sample {key}: label record out of range \({field}"):
        _all(copy, backend)
    loader, rows = _all(copy, backend, on_bad="skip")
    assert int(key) not in rows and loader.skipped == {"bad_sample": 1}
    assert len(rows) == read_total(copy) - 1


def read_total(out: Path) -> int:
    from affpipe.shards import read_manifest

    return read_manifest(out)["splits"]["val"]["samples"]


def _replace_jpeg(tar: Path, idx: Path, j: int, new: bytes) -> str:
    """Overwrite sample j's JPEG in place (same length, padded) and return its key."""
    comp = parse_idx(idx)[j]
    off, size, name = comp["jpg"]
    assert len(new) <= size
    _patch(tar, off, new + bytes(size - len(new)))
    return name.split(".")[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_off_size_frame_is_never_squashed(copy, backend):
    tar, idx = _val_shard(copy)
    ok, enc = cv2.imencode(".jpg", np.full((40, 60, 3), 50, np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 50])
    key = _replace_jpeg(tar, idx, 5, enc.tobytes())
    with pytest.raises(ValueError, match=rf"{tar.name}: sample {key}: frame is 60x40, the split's frames are 112x112"):
        _all(copy, backend)
    loader, rows = _all(copy, backend, on_bad="skip", image_size=64)
    assert int(key) not in rows and loader.skipped == {"bad_sample": 1}


def _empty_jpeg(tar: Path, idx: Path, j: int) -> str:
    """Make sample j's .jpg member 0 bytes long in the .idx (what a zero-byte file gave)."""
    lines = idx.read_text().splitlines()
    tok = lines[j + 1].split()
    key = tok[3].split(".")[0]
    tok[2] = "0"
    lines[j + 1] = " ".join(tok)
    idx.write_text("\n".join(lines) + "\n")
    return key


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_byte_jpeg_follows_on_bad(copy, backend):
    tar, idx = _val_shard(copy)
    key = _empty_jpeg(tar, idx, 2)
    with pytest.raises(ValueError, match=rf"{tar.name}: sample {key}: (empty|undecodable) JPEG"):
        _all(copy, backend)
    loader, rows = _all(copy, backend, on_bad="skip")
    assert int(key) not in rows and sum(loader.skipped.values()) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_idx_is_a_named_error(copy, backend):
    tar, idx = _val_shard(copy)
    idx.write_bytes(b"v1.2 7\n" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=rf"{tar.name}: .*{idx.name}.*malformed (last|index) line"):
        _all(copy, backend)
    loader, _ = _all(copy, backend, on_bad="skip")
    assert loader.skipped == {"bad_idx_shards": 1}


@pytest.mark.dali
@pytest.mark.parametrize("train", [False, True])
def test_dali_names_the_undecodable_sample(copy, train):
    tar, idx = _val_shard(copy)
    key = _replace_jpeg(tar, idx, 40, b"\xff\xd8\xff\xdb" + b"\x13" * 600)
    loader = make_loader(copy, "val", batch_size=16, train=train, backend="dali", num_workers=1)
    with pytest.raises(ValueError, match=rf"{tar.name}: sample {key}: undecodable JPEG"):
        for _ in loader:
            pass

