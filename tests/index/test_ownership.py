"""Issue 17, item 8 for ``index``: the index folder is ``affpipe index``'s own (affpipe.outdir).

A user's ``index.json`` (or any file ``index`` does not write) is refused and untouched, a
symlink is never followed, a rerun with the same inputs rewrites in place, one with other inputs
is one line suggesting a new folder or ``--overwrite`` (which deletes only index's files), two
runs never write at once, and an index folder of affpipe 0.2 (no marker) is taken over."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from affpipe.cli import main
from affpipe.outdir import LOCK, MARKER, folder_lock, read_marker


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> Path:
    """Two 3-video twins (``a`` with MTL files, ``b`` another seed)."""
    from affpipe.synth.generate import SynthConfig, generate

    root = tmp_path_factory.mktemp("own_index")
    generate(SynthConfig(out=root / "a", layout="abaw6", videos=3, frames=20, seed=0, mtl=True))
    generate(SynthConfig(out=root / "b", layout="abaw6", videos=3, frames=20, seed=1))
    return root


def _index(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["index", *args, "--workers", "1"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _one_error(output: str) -> str:
    errors = [seg for seg in re.split(r"[\r\n]", output) if "Error:" in seg]
    assert len(errors) == 1 and errors[0].startswith("Error:"), output[-2000:]
    return errors[0]


def test_a_users_index_json_is_refused_and_untouched(trees, tmp_path):
    out = tmp_path / "i"
    out.mkdir()
    (out / "index.json").write_text('{"my": "notes"}\n')
    code, output = _index(str(trees / "a"), "-o", str(out))
    assert code == 1
    assert "not empty and not written by `affpipe index`" in _one_error(output) and "index.json" in output
    assert (out / "index.json").read_text() == '{"my": "notes"}\n'
    assert sorted(p.name for p in out.iterdir()) == ["index.json"]  # no marker, no lock, no table


def test_same_inputs_rerun_in_place_other_inputs_refused_then_overwrite(trees, tmp_path):
    out = tmp_path / "i"
    assert _index(str(trees / "a"), "-o", str(out))[0] == 0
    first = (out / "frames.parquet").read_bytes()
    assert read_marker(out)["command"] == "index" and (out / "mtl_frames.parquet").is_file()
    assert _index(str(trees / "a"), "-o", str(out))[0] == 0  # same inputs: in place
    assert (out / "frames.parquet").read_bytes() == first
    code, output = _index(str(trees / "b"), "-o", str(out))
    line = _one_error(output)
    assert code == 1 and "other inputs" in line and "root:" in line and "--overwrite" in line
    assert str((trees / "a").resolve()) in line and str((trees / "b").resolve()) in line
    assert (out / "frames.parquet").read_bytes() == first  # nothing touched
    assert _index(str(trees / "b"), "-o", str(out), "--overwrite")[0] == 0
    assert (out / "frames.parquet").read_bytes() != first
    assert not (out / "mtl_frames.parquet").exists()  # the old MTL table went with its inputs
    assert read_marker(out)["inputs"]["root"] == str((trees / "b").resolve())


def test_a_foreign_file_is_refused_even_with_overwrite(trees, tmp_path):
    out = tmp_path / "i"
    assert _index(str(trees / "b"), "-o", str(out))[0] == 0
    (out / "thesis.txt").write_text("x")
    code, output = _index(str(trees / "a"), "-o", str(out), "--overwrite")
    assert code == 1 and "did not write (thesis.txt)" in _one_error(output)
    assert (out / "thesis.txt").read_text() == "x" and (out / "frames.parquet").is_file()


def test_a_symlink_in_the_folder_is_never_followed(trees, tmp_path):
    out, elsewhere = tmp_path / "i", tmp_path / "elsewhere"
    assert _index(str(trees / "b"), "-o", str(out))[0] == 0
    elsewhere.mkdir()
    (elsewhere / "keep.parquet").write_bytes(b"mine")
    (out / "frames.parquet").unlink()
    (out / "frames.parquet").symlink_to(elsewhere / "keep.parquet")
    code, output = _index(str(trees / "b"), "-o", str(out), "--overwrite")
    assert code == 1 and "frames.parquet (symlink)" in _one_error(output)
    assert (elsewhere / "keep.parquet").read_bytes() == b"mine"


def test_a_second_index_into_a_busy_folder_is_refused(trees, tmp_path):
    out = tmp_path / "i"
    assert _index(str(trees / "b"), "-o", str(out))[0] == 0
    with folder_lock(out, LOCK, "affpipe index"):  # another process writing into it
        code, output = _index(str(trees / "b"), "-o", str(out))
    assert code == 1 and "busy" in _one_error(output)


def test_an_index_of_affpipe_0_2_is_taken_over_a_lookalike_is_not(trees, tmp_path):
    out = tmp_path / "i"
    assert _index(str(trees / "b"), "-o", str(out))[0] == 0
    (out / MARKER).unlink()  # as 0.2 left it: no marker
    (out / LOCK).unlink()
    assert _index(str(trees / "b"), "-o", str(out))[0] == 0
    assert read_marker(out)["command"] == "index"
    fake = tmp_path / "fake"
    shutil.copytree(out, fake)
    (fake / MARKER).unlink()
    (fake / "index.json").write_text(json.dumps({"schema_version": 1}))  # not an index affpipe wrote
    code, output = _index(str(trees / "b"), "-o", str(fake))
    assert code == 1 and "not written by `affpipe index`" in _one_error(output)
    assert json.loads((fake / "index.json").read_text()) == {"schema_version": 1}


def test_an_unmarked_index_of_another_root_is_adopted_as_that_root_and_refused(trees, tmp_path):
    """Issue 24: adoption compares what the old index was made from, not file names."""
    out = tmp_path / "i"
    assert _index(str(trees / "a"), "-o", str(out))[0] == 0
    (out / MARKER).unlink()  # an affpipe 0.2 index of tree a
    (out / LOCK).unlink()
    before = (out / "frames.parquet").read_bytes()
    code, output = _index(str(trees / "b"), "-o", str(out))
    err = _one_error(output)
    assert code == 1 and "other inputs" in err and str(trees / "a") in err and str(trees / "b") in err
    assert (out / "frames.parquet").read_bytes() == before
    assert read_marker(out)["inputs"]["root"] == str((trees / "a").resolve())
    assert _index(str(trees / "b"), "-o", str(out), "--overwrite")[0] == 0


def test_index_at_0_bytes_free_names_the_file(trees, tmp_path, monkeypatch):
    import errno
    import os

    def full(fd, data, offset):  # the first write into the folder: the lock's pid
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    code, output = _index(str(trees / "b"), "-o", str(tmp_path / "i"))
    assert code == 1 and _one_error(output).startswith(f"Error: {tmp_path / 'i' / LOCK}: disk full")
