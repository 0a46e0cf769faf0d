"""Tests of affpipe.shards.write: round trip, skips, shuffle, determinism, resume, DALI index format."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
from support import make_index

from affpipe.labels import decode_records, records_from_table
from affpipe.shards import (
    ShardConfig,
    load_table,
    read_manifest,
    shard_paths,
    verify_shards,
    write_grid,
    write_shards,
)
from affpipe.shards.format import tar_header

VENV_BIN = Path(sys.executable).parent



@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    return make_index(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def shards(index, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s"
    write_shards(ShardConfig(index=index, out=out, samples_per_shard=17, workers=1, seed=3))
    return out


def read_samples(tar: Path) -> list[tuple[str, bytes, bytes]]:
    """(key, jpg bytes, lbl bytes) of a shard, read with the standard tarfile reader."""
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
        assert [m.name.split(".")[1] for m in members] == ["jpg", "lbl"] * (len(members) // 2)
        out = []
        for jpg, lbl in zip(members[::2], members[1::2], strict=True):
            assert jpg.name[:-4] == lbl.name[:-4]
            assert (jpg.mtime, jpg.uid, jpg.gid, jpg.mode, jpg.uname) == (0, 0, 0, 0o644, "")
            out.append((jpg.name[:-4], tf.extractfile(jpg).read(), tf.extractfile(lbl).read()))
    return out


def test_tar_header_equals_tarfile():
    for name, size in [("0000000000.jpg", 0), ("0000000007.lbl", 32), ("0123456789.jpg", 5123), ("a.b", 8**11 - 1)]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
        assert tar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def test_round_trip_and_skip_counts(index, shards):
    tbl, meta = load_table(index)
    rows = tbl.to_pylist()
    table_rec = records_from_table(tbl)
    manifest = read_manifest(shards)
    assert manifest["options"] == {"split": "all", "table": "frames", "tasks": ["au", "expr", "va"],
                                   "samples_per_shard": 17, "seed": 3, "frame_size": None,
                                   "resize_off_size": False, "unlabelled": True}
    for split in ("train", "val"):
        rows_s = [r for r in rows if r["split"] == split]
        kept = {r["row_id"] for r in rows_s if r["has_image"] and (r["va_valid"] or r["expr_valid"] or r["au_valid"])}
        info = manifest["splits"][split]
        no_label = sum(r["has_image"] and not (r["va_valid"] or r["expr_valid"] or r["au_valid"]) for r in rows_s)
        # the unlabelled frames are written (in shards of their own), not skipped
        assert info["skipped"] == {"no_image": sum(not r["has_image"] for r in rows_s), "no_label": 0, "bad_image": 0}
        assert info["skipped"]["no_image"] > 0 and no_label > 0 and info["unlabelled"]["samples"] == no_label
        assert info["counts"] == {"labelled": info["samples"], "unlabelled": no_label}
        seen = []
        for (tar, _idx), entry in zip(shard_paths(shards, split), info["shards"], strict=True):
            samples = read_samples(tar)
            assert len(samples) == entry["samples"] <= 17 and tar.stat().st_size == entry["bytes"]
            for key, jpg, lbl in samples:
                row = rows[int(key)]
                source = Path(meta["image_roots"][row["image_root"]]) / row["image"]
                assert jpg == source.read_bytes()
                assert lbl == table_rec[int(key)].tobytes()
                assert int(decode_records(lbl)["row_id"][0]) == int(key)
                seen.append(int(key))
        assert sorted(seen) == sorted(kept) and len(seen) == len(kept) == info["samples"]
        if split == "val":
            assert seen == sorted(seen, key=lambda i: (rows[i]["video"], rows[i]["frame"]))
    assert verify_shards(shards, decode=True) == []


def test_train_is_shuffled_globally(index, shards, tmp_path):
    tbl, _ = load_table(index)
    video = dict(zip(tbl["row_id"].to_pylist(), tbl["video"].to_pylist(), strict=True))
    keys = [k for tar, _ in shard_paths(shards, "train") for k, _, _ in read_samples(tar)]
    same = np.mean([video[int(a)] == video[int(b)] for a, b in zip(keys, keys[1:], strict=False)])
    assert same < 0.45  # 4 train videos: ~0.25 when shuffled, ~0.97 in (video, frame) order
    other = tmp_path / "seed4"
    write_shards(ShardConfig(index=index, out=other, split="train", samples_per_shard=17, workers=1, seed=4))
    keys4 = [k for tar, _ in shard_paths(other, "train") for k, _, _ in read_samples(tar)]
    assert sorted(keys4) == sorted(keys) and keys4 != keys


@pytest.mark.dali
def test_idx_equals_wds2idx(shards, tmp_path):
    """Our .idx (written with the shard, and index_tar's for any tar) equals DALI's wds2idx."""
    from affpipe.shards.format import index_tar

    wds2idx = VENV_BIN / "wds2idx"
    if not wds2idx.exists():
        pytest.skip("wds2idx (from DALI) not installed")
    for split in ("train", "val"):
        for tar, idx in shard_paths(shards, split):
            ref = tmp_path / (tar.stem + ".idx")
            subprocess.run([str(wds2idx), str(tar), str(ref)], check=True, capture_output=True)
            assert idx.read_text() == ref.read_text()
            index_tar(tar, tmp_path / "ours.idx")
            assert (tmp_path / "ours.idx").read_text() == ref.read_text()


def _tree_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and ".state" not in p.parts}


def test_deterministic_and_parallel(index, shards, tmp_path):
    out = tmp_path / "again"
    write_shards(ShardConfig(index=index, out=out, samples_per_shard=17, workers=2, seed=3))
    a, b = _tree_bytes(shards), _tree_bytes(out)
    a.pop("manifest.json"), b.pop("manifest.json")
    assert a == b and len(a) > 4
    assert read_manifest(out) == read_manifest(shards)


def test_task_filter(index, tmp_path):
    manifest = write_shards(ShardConfig(index=index, out=tmp_path / "e", split="val", tasks=("expr",), workers=1,
                                        unlabelled=False))
    tbl, _ = load_table(index)
    val = tbl.filter(pa.compute.equal(tbl["split"], "val")).to_pylist()
    assert manifest["splits"]["val"]["samples"] == sum(r["has_image"] and r["expr_valid"] for r in val)
    assert manifest["splits"]["val"]["skipped"]["no_label"] == sum(r["has_image"] and not r["expr_valid"] for r in val)
    assert list(manifest["splits"]) == ["val"] and len(manifest["splits"]["val"]["shards"]) == 1
    assert "unlabelled" not in manifest["splits"]["val"]
    assert verify_shards(tmp_path / "e") == []
    # by default the frames without an EXPR label go to the unlabelled shards, their records masked
    default = write_shards(ShardConfig(index=index, out=tmp_path / "d", split="val", tasks=("expr",), workers=1))
    assert default["splits"]["val"]["unlabelled"]["samples"] == sum(r["has_image"] and not r["expr_valid"] for r in val)
    assert verify_shards(tmp_path / "d") == []


def test_missing_image_is_an_error_naming_it(tmp_path):
    index = make_index(tmp_path / "tree", videos=3, frames=8)
    _, meta = load_table(index)
    victim = Path(meta["image_roots"][0]) / "001-0" / "00003.jpg"
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="001-0/00003.jpg"):
        write_shards(ShardConfig(index=index, out=tmp_path / "s", workers=1))
    assert not list((tmp_path / "s").rglob("*.tmp")) and not (tmp_path / "s" / "manifest.json").exists()


_KILLER = """
import os, signal, sys
from pathlib import Path
import affpipe.shards.write as s
calls = 0
real = s._read_file
def read(path):
    global calls
    calls += 1
    if calls == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, like a crash or an OOM kill
    return real(path)
s._read_file = read
s.write_shards(s.ShardConfig(index=Path(sys.argv[1]), out=Path(sys.argv[2]), samples_per_shard=17, workers=1, seed=3))
"""


def test_resume_after_kill(index, shards, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(index), str(out), "45"], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    finished = sorted(p.name for p in (out / "train").glob("*.tar"))
    assert finished == ["train-000000.tar", "train-000001.tar"]  # 45th frame is in the 3rd shard
    assert (out / "train" / "train-000002.tar.tmp").exists() and not (out / "manifest.json").exists()
    # A finished shard damaged after the fact is redone too, not trusted.
    with open(out / "train" / "train-000001.tar", "r+b") as f:
        f.truncate(1000)
    mtime0 = (out / "train" / "train-000000.tar").stat().st_mtime_ns
    write_shards(ShardConfig(index=index, out=out, samples_per_shard=17, workers=1, seed=3))
    assert (out / "train" / "train-000000.tar").stat().st_mtime_ns == mtime0  # kept
    assert not list(out.rglob("*.tmp"))
    assert verify_shards(out) == []
    a, b = _tree_bytes(shards), _tree_bytes(out)
    assert a == b


def test_rerun_with_fewer_shards_removes_stale_ones(index, tmp_path):
    out = tmp_path / "s"
    write_shards(ShardConfig(index=index, out=out, split="val", samples_per_shard=5, workers=1))
    before = sorted(p.name for p in (out / "val").iterdir())
    assert len(before) > 4
    # issue 24: nothing shard wrote is deleted without --overwrite; other options are refused naming them
    with pytest.raises(FileExistsError, match=r"samples_per_shard: 5 \(in the folder\) vs 1000 \(now\).*--overwrite"):
        write_shards(ShardConfig(index=index, out=out, split="val", samples_per_shard=1000, workers=1))
    assert sorted(p.name for p in (out / "val").iterdir()) == before
    write_shards(ShardConfig(index=index, out=out, split="val", samples_per_shard=1000, workers=1, overwrite=True))
    assert sorted(p.name for p in (out / "val").iterdir()) == ["val-000000.idx", "val-000000.tar",
                                                               "val-unlabelled-000000.idx", "val-unlabelled-000000.tar"]
    assert verify_shards(out) == []
    # Same shard names, another seed: every shard is rewritten, none is wrongly reused.
    write_shards(ShardConfig(index=index, out=out, split="train", samples_per_shard=20, workers=1, seed=0, overwrite=True))
    write_shards(ShardConfig(index=index, out=out, split="train", samples_per_shard=20, workers=1, seed=9, overwrite=True))
    fresh = tmp_path / "fresh"
    write_shards(ShardConfig(index=index, out=fresh, split="train", samples_per_shard=20, workers=1, seed=9))
    assert {k: v for k, v in _tree_bytes(out).items() if not k.startswith("val")} == _tree_bytes(fresh)


def test_write_grid(shards, tmp_path):
    png = write_grid(shards, tmp_path / "grid.png", n=9, seed=1, split="val")
    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100


@pytest.mark.dali
def test_dali_reads_shards_through_idx(shards):
    from nvidia.dali import fn, pipeline_def

    for split in ("train", "val"):
        pairs = shard_paths(shards, split)
        want = [k for tar, _ in pairs for k, _, _ in read_samples(tar)]

        @pipeline_def(batch_size=8, num_threads=1, device_id=None)
        def pipe(pairs=pairs):
            jpg, lbl = fn.readers.webdataset(
                paths=[str(t) for t, _ in pairs], index_paths=[str(i) for _, i in pairs],
                ext=["jpg", "lbl"], missing_component_behavior="error", name="reader",
            )
            return jpg, lbl, fn.get_property(jpg, key="source_info")

        p = pipe()
        p.build()
        assert p.epoch_size("reader") == len(want)
        got, sources = [], []
        while len(got) < len(want):
            jpg, lbl, src = p.run()
            for i in range(len(lbl)):
                got.append(int(np.asarray(lbl.at(i)).view(np.int64)[0]))
                sources.append(bytes(np.asarray(src.at(i))).decode())
        got, sources = got[:len(want)], sources[:len(want)]
        assert [f"{r:010d}" for r in got] == want
        assert [s.rsplit(":", 1)[1] for s in sources] == [f"{k}.jpg" for k in want]


def test_cli_shard_verify_show(index, tmp_path):
    from click.testing import CliRunner

    from affpipe.cli import main

    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(main, ["shard", str(index), "-o", str(out), "--split", "train", "--tasks", "va,au",
                               "--samples-per-shard", "40", "--workers", "1", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert "train:" in res.output and read_manifest(out)["options"]["tasks"] == ["au", "va"]
    res = runner.invoke(main, ["verify", str(out), "--decode"])
    assert res.exit_code == 0 and "all shards OK" in res.output
    res = runner.invoke(main, ["show", str(out), "-o", str(tmp_path / "g.png"), "--n", "4"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "g.png").stat().st_size > 0
    os.remove(out / "train" / "train-000000.idx")
    res = runner.invoke(main, ["verify", str(out)])
    assert res.exit_code == 1 and "train-000000.idx missing" in res.output


def test_session_fixtures_shard_and_verify(index_dir, shard_dir, tmp_path):
    """The shared synthetic tree → index → shards chain: verify passes, counts add up."""
    assert verify_shards(shard_dir, decode=True) == []
    tbl, _ = load_table(index_dir)
    manifest = read_manifest(shard_dir)
    for split, info in manifest["splits"].items():
        n = sum(1 for r in tbl.filter(pa.compute.equal(tbl["split"], split)).to_pylist())
        unlabelled = info.get("unlabelled", {}).get("samples", 0)
        assert info["samples"] + unlabelled + sum(info["skipped"].values()) == n
    if (index_dir / "mtl_frames.parquet").exists():
        out = tmp_path / "mtl"
        m = write_shards(ShardConfig(index=index_dir, out=out, table="mtl", samples_per_shard=50, workers=1))
        assert m["table"] == "mtl" and m["splits"]["train"]["samples"] > 0
        assert verify_shards(out) == []
