"""Issue 12, item 15: bad input through the CLI gives one ``Error:`` line and a non-zero exit,
never a traceback (each case builds its bad input from a tiny synthetic tree)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from affpipe.cli import main


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """tree/, index/ and shards/ of a 3-video synthetic twin."""
    from affpipe.index.build import IndexConfig, build_index
    from affpipe.shards.write import ShardConfig, write_shards
    from affpipe.synth.generate import SynthConfig, generate

    root = tmp_path_factory.mktemp("i12cli")
    generate(SynthConfig(out=root / "tree", layout="abaw6", videos=3, frames=20, seed=0))
    build_index(IndexConfig(root=root / "tree", out=root / "index", workers=1))
    write_shards(ShardConfig(index=root / "index", out=root / "shards", samples_per_shard=100, workers=1))
    return root


def _copy(base: Path, tmp: Path, name: str) -> Path:
    shutil.copytree(base / name, tmp / name, symlinks=True)
    return tmp / name


def _ann(tree: Path) -> Path:
    return next(tree.glob("*Annotations*"))


def _manifest(shards: Path, change) -> list[str]:
    m = json.loads((shards / "manifest.json").read_text())
    change(m)
    (shards / "manifest.json").write_text(json.dumps(m))
    return ["verify", str(shards)]


def _unreadable(base, tmp, mp):
    tree = _copy(base, tmp, "tree")
    real = os.scandir
    ann = _ann(tree)

    def scandir(path="."):  # tests run as root, where chmod 000 does not stop a read
        if Path(path) == ann:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    mp.setattr(os, "scandir", scandir)
    return ["index", str(tree), "-o", str(tmp / "i")]


def _dir_as_frame(base, tmp, mp):
    tree = _copy(base, tmp, "tree")
    frame = next(p for p in (tree / "cropped_aligned").rglob("00010.jpg"))
    frame.unlink()
    frame.mkdir()
    from affpipe.index.build import IndexConfig, build_index

    build_index(IndexConfig(root=tree, out=tmp / "i", workers=1))
    return ["shard", str(tmp / "i"), "-o", str(tmp / "s"), "--workers", "1"]


def _symlink_loop(base, tmp, mp):
    tree = _copy(base, tmp, "tree")
    os.symlink("..", _ann(tree) / "loop")
    return ["index", str(tree), "-o", str(tmp / "i")]


def _non_utf8(base, tmp, mp):
    tree = _copy(base, tmp, "tree")
    va = next(_ann(tree).glob("VA_*")) / "Train_Set"
    shutil.copy(next(va.glob("*.txt")), os.fsdecode(os.fsencode(va) + b"/vid\xff.txt"))
    return ["index", str(tree), "-o", str(tmp / "i")]


def _huge_line(base, tmp, mp):
    tree = _copy(base, tmp, "tree")
    f = next((next(_ann(tree).glob("VA_*")) / "Train_Set").glob("*.txt"))
    f.write_text("valence,arousal\n0.1,0.2\n0.5," + "7" * 20_000_000 + "x\n")
    return ["index", str(tree), "-o", str(tmp / "i")]


def _garbage_idx_loader(base, tmp, mp):
    shards = _copy(base, tmp, "shards")
    next((shards / "val").glob("*.idx")).write_bytes(b"v1.2 3\n" + bytes(range(256)) * 4)
    return ["train", "--task", "va", "--shards", str(shards), "-o", str(tmp / "run"), "--backend", "torch",
            "--device", "cpu", "--num-workers", "0", "--batch-size", "4", "--image-size", "32"]


def _bad_recipe(key: str, value: str):
    def case(base, tmp, mp):
        recipe = tmp / "r.toml"
        section, _, name = key.rpartition(".")
        recipe.write_text('task = "va"\n' + (f"[{section}]\n" if section else "") + f"{name} = {value}\n")
        return ["train", "--config", str(recipe), "--shards", str(base / "shards"), "-o", str(tmp / "run")]
    return case


def _not_a_checkpoint(base, tmp, mp):
    (tmp / "notes.pt").write_text("epoch 3: 0.41\n")
    return ["evaluate", str(tmp / "notes.pt"), "--shards", str(base / "shards")]


def _disk_full(base, tmp, mp):
    import affpipe.shards.write as shards_mod

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr(shards_mod.os, "fsync", fsync)
    return ["shard", str(base / "index"), "-o", str(tmp / "full"), "--workers", "1"]


CASES = {
    "unreadable folder": (_unreadable, "cannot list this folder"),
    "folder named 00010.jpg": (_dir_as_frame, "00010.jpg"),
    "symlink loop": (_symlink_loop, "symlink loop"),
    "non-UTF-8 file name": (_non_utf8, "not valid UTF-8"),
    "20 MB line": (_huge_line, "non-numeric value"),
    "manifest missing key": (lambda b, t, m: _manifest(_copy(b, t, "shards"), lambda x: x.pop("options")), "missing key options"),
    "manifest wrong type": (lambda b, t, m: _manifest(_copy(b, t, "shards"), lambda x: x["splits"]["train"].update(samples=[1])), "must be int"),
    "manifest invalid JSON": (lambda b, t, m: [(lambda s: ((s / "manifest.json").write_text("{"), "verify")[1])(_copy(b, t, "shards")), str(t / "shards")], "not valid JSON"),
    "loader on a garbage .idx": (_garbage_idx_loader, "malformed last line"),
    "shard --samples-per-shard 0": (lambda b, t, m: ["shard", str(b / "index"), "-o", str(t / "s"), "--samples-per-shard", "0"], "--samples-per-shard"),
    "shard --workers 0": (lambda b, t, m: ["shard", str(b / "index"), "-o", str(t / "s"), "--workers", "0"], "--workers"),
    "shard --tasks foo": (lambda b, t, m: ["shard", str(b / "index"), "-o", str(t / "s"), "--tasks", "foo"], "tasks must be"),
    "shard --seed -1": (lambda b, t, m: ["shard", str(b / "index"), "-o", str(t / "s"), "--seed", "-1"], "--seed"),
    "verify without a manifest": (lambda b, t, m: ["verify", str(t)], "no manifest"),
    "show --n 0": (lambda b, t, m: ["show", str(b / "shards"), "-o", str(t / "g.png"), "--n", "0"], "--n"),
    "evaluate --batch-size 0": (lambda b, t, m: ["evaluate", str(t), "--shards", str(b / "shards"), "--batch-size", "0"], "--batch-size"),
    "recipe lr < 0": (_bad_recipe("lr", "-0.1"), "lr must be"),
    "recipe weight_decay < 0": (_bad_recipe("weight_decay", "-1.0"), "weight_decay must be"),
    "recipe plateau_factor >= 1": (_bad_recipe("plateau_factor", "1.5"), "plateau_factor must be"),
    "recipe backend": (_bad_recipe("loader.backend", '"gpu"'), "backend must be one of"),
    "recipe device": (_bad_recipe("device", '"tpu"'), "device must be one of"),
    "recipe num_workers < 0": (_bad_recipe("loader.num_workers", "-2"), "num_workers must be"),
    "recipe flip_p": (_bad_recipe("loader.flip_p", "2.0"), "flip_p must be"),
    "recipe max_rotation": (_bad_recipe("loader.max_rotation", "-1.0"), "max_rotation must be"),
    "recipe seed < 0": (_bad_recipe("seed", "-1"), "seed must be"),
    "not a checkpoint": (_not_a_checkpoint, "notes.pt: refused"),
    "disk full": (_disk_full, "No space left on device"),  # (names the file: .state/inputs.json, the first written)
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_error_line(base, tmp_path, monkeypatch, case):
    make, expected = CASES[case]
    args = make(base, tmp_path, monkeypatch)
    result = CliRunner().invoke(main, args)
    out = result.output
    assert result.exit_code != 0, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out
    # A progress bar may share the line (an interrupted tqdm leaves no newline): read from "Error:".
    errors = [line[line.index("Error:"):] for line in re.split(r"[\r\n]", out) if "Error:" in line]
    assert len(errors) == 1, out[-2000:]
    assert errors[0].startswith("Error:") and expected in errors[0] and len(errors[0]) < 1000, errors[0][:2000]
    if case == "disk full":  # nothing half-written is left behind
        assert not list((tmp_path / "full").rglob("*.tmp")) and not list((tmp_path / "full").rglob("*.tar"))


@pytest.mark.parametrize("damage, expected", [
    ("idx", "first line"), ("tar", "non-numeric size field"),
])
def test_verify_lists_damage_and_exits_1(base, tmp_path, damage, expected):
    shards = _copy(base, tmp_path, "shards")
    if damage == "idx":
        next((shards / "train").glob("*.idx")).write_bytes(bytes(range(256)) * 4)
    else:
        tar = next((shards / "train").glob("*.tar"))
        data = bytearray(tar.read_bytes())
        data[124:136] = b"zzzzzzzzzzz\0"
        data[148:156] = b" " * 8
        data[148:155] = b"%06o\0" % sum(data[:512])
        tar.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(shards)])
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    assert expected in result.output and "Traceback" not in result.output
