"""Issue 17, item 9: messages that say what the user needs — which file, which flag, which
encoding — each reproduced through the command that showed it."""

from __future__ import annotations

import errno
import logging
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from affpipe.cli import main


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _error_line(output: str) -> str:
    """The one ``Error:`` line, which must start a line of its own (no progress bar before it)."""
    segments = [seg for seg in re.split(r"[\r\n]", output) if "Error:" in seg]
    assert len(segments) == 1, output[-2000:]
    assert segments[0].startswith("Error:"), f"glued to other output: {segments[0][:300]!r}"
    return segments[0]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    from affpipe.synth.generate import SynthConfig, generate

    root = tmp_path_factory.mktemp("messages") / "tree"
    generate(SynthConfig(out=root, layout="abaw6", videos=3, frames=20, seed=0))
    return root


@pytest.mark.parametrize("encoding, bom", [("utf-16", "with"), ("utf-16-le", "without"), ("utf-16-be", "without")])
def test_utf16_annotation_file_says_utf16_on_a_line_of_its_own(tree, tmp_path, encoding, bom):
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    va = sorted((next(copy.glob("*Annotations*")) / "VA_Estimation_Challenge" / "Train_Set").glob("*.txt"))[-1]
    va.write_bytes(va.read_text().encode(encoding))  # "utf-16" writes a byte-order mark
    code, output = _run(["index", str(copy), "-o", str(tmp_path / "i"), "--workers", "1"])
    line = _error_line(output)
    assert code == 1 and line.startswith(f"Error: {va}:1: UTF-16 text") and line.endswith("save it as UTF-8")
    assert ("no byte-order mark" in line) == (bom == "without")


def test_utf16_test_list_says_utf16(tmp_path):
    from affpipe.index.testsets import read_test_list

    lst = tmp_path / "VA_test_set_release.txt"
    lst.write_bytes("video1\nvideo2\n".encode("utf-16"))
    with pytest.raises(ValueError, match=rf"{lst}:1: UTF-16 text; save it as UTF-8"):
        read_test_list(lst)


def test_bad_jpeg_hint_names_the_flag(shard_dir, tmp_path):
    from affpipe.loaders import make_loader
    from affpipe.shards.format import parse_idx

    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    tar = sorted((shards / "val").glob("*.tar"))[0]
    off, size, _ = parse_idx(tar.with_suffix(".idx"))[2]["jpg"]
    with open(tar, "r+b") as f:  # the JPEG's bytes replaced by garbage of the same length
        f.seek(off)
        f.write(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))
    loader = make_loader(shards, "val", batch_size=8, train=False, backend="torch", num_workers=0)
    with pytest.raises(ValueError, match="undecodable") as info:
        list(loader)
    assert "--on-bad skip" in str(info.value) and "on_bad='skip'" not in str(info.value)


def test_train_on_a_full_disk_names_the_checkpoint(shard_dir, tmp_path, monkeypatch):
    import affpipe.run.checkpoint as checkpoint

    def full(obj, fh, *a, **kw):  # what torch.save says when the disk fills mid-write
        fh.write(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4288 vs 4176")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    run = tmp_path / "run"
    code, output = _run(["train", "--task", "va", "--shards", str(shard_dir), "-o", str(run), "--epochs", "1",
                         "--image-size", "32", "--batch-size", "16", "--max-steps-per-epoch", "2", "--max-val-steps", "3",
                         "--num-workers", "0", "--backend", "torch", "--device", "cpu"])
    line = _error_line(output)
    assert code == 1 and line.startswith(f"Error: {run / 'last.pt'}: disk full / could not write ([enforce fail at")
    assert not list(run.glob("*.pt")) and not list(run.glob("*.tmp"))  # nothing half-written left


def test_write_error_names_the_file_for_an_oserror_without_one():
    from affpipe.io import write_error

    err = write_error("/runs/a/metrics.jsonl", OSError(errno.ENOSPC, "No space left on device"))
    assert str(err) == "/runs/a/metrics.jsonl: disk full / could not write ([Errno 28] No space left on device)"
    named = FileNotFoundError(errno.ENOENT, "No such file", "/x")
    assert write_error("/y", named) is named  # already names its file
    other = RuntimeError("CUDA error: out of memory")
    assert write_error("/y", other) is other  # not a write failure


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_synth_test_lists_are_never_empty_and_index_takes_them_silently(tmp_path, seed, caplog):
    from affpipe.index.build import IndexConfig, build_index
    from affpipe.synth.generate import SynthConfig, generate

    summary = generate(SynthConfig(out=tmp_path / "t", layout="abaw6", videos=3, frames=20, seed=seed, test_videos=2))
    lists = [Path(p) for p in summary["test_set"]["lists"]]
    names = [p for p in lists if p.parent.name == "names_of_videos_in_each_test_set"]
    assert len(names) == 3 and all(p.read_text().strip() for p in names), [p.read_text() for p in names]
    with caplog.at_level(logging.WARNING, logger="affpipe.index"):
        counts = build_index(IndexConfig(root=tmp_path / "t", out=tmp_path / "i", workers=1))
    assert not [r for r in caplog.records if "test-set list" in r.getMessage()], caplog.text
    assert counts["splits"]["test"] > 0


def test_a_full_disk_during_any_atomic_write_names_the_file(tmp_path, monkeypatch):
    import affpipe.io as io

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", fsync)
    target = tmp_path / "config.json"
    with pytest.raises(OSError, match=rf"^{target}: disk full / could not write \(\[Errno 28\] No space left"):
        io.atomic_write_text(target, "{}\n")
    assert list(tmp_path.iterdir()) == []  # no partial file, no .tmp
