"""affpipe.outdir: a command's output folder holds only its files, one writer at a time."""

from __future__ import annotations

import json
import os

import pytest

from affpipe.outdir import LOCK, MARKER, Owner, claim, read_marker

OWNER = Owner("embed", ("features.arrow", "manifest.json", "parts/*.arrow"))


def test_new_folder_is_claimed_and_marked(tmp_path):
    out = tmp_path / "f"
    with claim(out, OWNER, {"source": "a"}) as c:
        assert c.fresh and c.existing == []
        c.path("parts/train-000000.arrow").write_bytes(b"x")
    assert read_marker(out) == {"command": "embed", "version": 1, "inputs": {"source": "a"}}
    with claim(out, OWNER, {"source": "a"}) as c:  # same inputs: resumes, sees its files
        assert not c.fresh and c.existing == ["parts/train-000000.arrow"]


def test_a_users_folder_is_refused_and_untouched(tmp_path):
    out = tmp_path / "f"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "thesis.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"not empty and not written by `affpipe embed`.*parts/thesis.txt"):
        with claim(out, OWNER, {}):
            pass
    assert (out / "parts" / "thesis.txt").read_text() == "x"
    assert not (out / MARKER).exists() and not (out / LOCK).exists()


def test_foreign_file_in_our_folder_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "f"
    with claim(out, OWNER, {"source": "a"}) as c:
        c.path("manifest.json").write_text("{}")
    (out / "parts").mkdir()
    (out / "parts" / "thesis.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"did not write \(parts/thesis.txt\)"):
        with claim(out, OWNER, {"source": "b"}, overwrite=True):
            pass
    assert (out / "parts" / "thesis.txt").exists() and (out / "manifest.json").exists()


def test_symlink_inside_is_refused_and_never_followed(tmp_path):
    out, elsewhere = tmp_path / "f", tmp_path / "elsewhere"
    elsewhere.mkdir()
    with claim(out, OWNER, {}):
        pass
    os.symlink(elsewhere, out / "parts")
    with pytest.raises(FileExistsError, match=r"parts \(symlink\)"):
        with claim(out, OWNER, {}):
            pass
    assert list(elsewhere.iterdir()) == []


def test_other_inputs_refused_naming_both_sides_then_overwrite_deletes_only_ours(tmp_path):
    out = tmp_path / "f"
    with claim(out, OWNER, {"source": "run1"}) as c:
        c.path("parts/val-000000.arrow").write_bytes(b"1")
    with pytest.raises(FileExistsError, match=r"source: 'run1' \(in the folder\) vs 'run2' \(now\).*--overwrite"):
        with claim(out, OWNER, {"source": "run2"}):
            pass
    assert (out / "parts" / "val-000000.arrow").exists()
    with claim(out, OWNER, {"source": "run2"}, overwrite=True) as c:
        assert c.fresh and c.existing == []
    assert not (out / "parts").exists()
    assert json.loads((out / MARKER).read_text())["inputs"] == {"source": "run2"}


def test_another_commands_folder_is_refused(tmp_path):
    out = tmp_path / "f"
    with claim(out, Owner("index", ("index.json",)), {}):
        pass
    with pytest.raises(FileExistsError, match=r"written by `affpipe index`, not `affpipe embed`"):
        with claim(out, OWNER, {}):
            pass


def test_second_writer_finds_the_folder_busy(tmp_path):
    out = tmp_path / "f"
    with claim(out, OWNER, {}):
        with pytest.raises(FileExistsError, match=r"busy: another `affpipe embed`"):
            with claim(out, OWNER, {}):
                pass


def test_path_refuses_names_the_command_does_not_write(tmp_path):
    with claim(tmp_path / "f", OWNER, {}) as c:
        with pytest.raises(ValueError, match="not a file `affpipe embed` writes"):
            c.path("../escape.txt")


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        with claim(tmp_path / "f", OWNER, {}):
            pass
