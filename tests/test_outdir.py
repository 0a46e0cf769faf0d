"""affpipe.outdir: a command's output folder holds only its files, one writer at a time."""

from __future__ import annotations

import json
import os
import re

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


# ---- issue 24: ownership at every depth, never through a link ------------------------------


def _owners():
    from affpipe.run.claim import RUN_OWNER
    from affpipe.runs.embed import OWNER as EMBED_OWNER
    from affpipe.runs.submission import PREDICT_OWNER

    return {"predict": (PREDICT_OWNER, "VA/v1.txt", "VA/old/keep.txt"),
            "train": (RUN_OWNER, "eval.json", "eval_archive/2023.json"),
            "embed": (EMBED_OWNER, "parts/train-000000.arrow", "parts/archive/old.arrow")}


@pytest.mark.parametrize("command", ["predict", "train", "embed"])
def test_a_users_file_one_level_below_our_names_is_refused_and_survives_overwrite(tmp_path, command):
    owner, ours, users = _owners()[command]
    out = tmp_path / "f"
    with claim(out, owner, {"v": 1}) as c:
        c.path(ours).write_text("ours")
    (out / users).parent.mkdir(parents=True, exist_ok=True)
    (out / users).write_text("user's")
    assert not owner.owns(users)
    for inputs in ({"v": 1}, {"v": 2}):
        with pytest.raises(FileExistsError, match=f"did not write \\({users}\\)"):
            with claim(out, owner, inputs, overwrite=True):
                pass
    assert (out / users).read_text() == "user's" and (out / ours).read_text() == "ours"


def test_patterns_match_one_component_each_and_double_star_spans_levels():
    from affpipe.outdir import path_matches

    assert path_matches("VA/v1.txt", "VA/*.txt") and not path_matches("VA/old/keep.txt", "VA/*.txt")
    assert path_matches("eval_val.json", "eval*.json") and not path_matches("eval_a/2023.json", "eval*.json")
    assert path_matches("data/twin/index/index.json", "data/**") and not path_matches("data", "data/**")
    assert not path_matches("../x.txt", "*/x.txt") and not path_matches("a//b", "a/*/b")


def _hostile_tree(out, elsewhere):
    """Our files at three depths plus, at each depth, a user's file, a link to a file and a link
    to a folder outside."""
    owner = Owner("t", ("a.bin", "d1/*.bin", "d1/d2/*.bin"))
    with claim(out, owner, {"v": 1}) as c:
        for rel in ("a.bin", "d1/b.bin", "d1/d2/c.bin"):
            c.path(rel).write_text("ours")
    (elsewhere / "precious.txt").write_text("p")
    return owner


@pytest.mark.parametrize("depth", ["", "d1/", "d1/d2/"])
@pytest.mark.parametrize("what", ["user file", "link to a file", "link to a folder"])
def test_a_tree_of_user_files_and_links_at_each_level_is_refused_and_kept(tmp_path, depth, what):
    out, elsewhere = tmp_path / "f", tmp_path / "elsewhere"
    elsewhere.mkdir()
    owner = _hostile_tree(out, elsewhere)
    rel = f"{depth}x.bin" if what == "link to a file" else f"{depth}notes.txt" if what == "user file" else f"{depth}sub"
    if what == "user file":
        (out / rel).write_text("user's")
    elif what == "link to a file":
        os.symlink(elsewhere / "precious.txt", out / rel)  # named as one of ours would be (d*/x.bin)
    else:
        os.symlink(elsewhere, out / rel)
    for inputs in ({"v": 1}, {"v": 2}):
        with pytest.raises(FileExistsError, match=re.escape(rel)):
            with claim(out, owner, inputs, overwrite=True):
                pass
    assert (elsewhere / "precious.txt").read_text() == "p" and sorted(p.name for p in elsewhere.iterdir()) == ["precious.txt"]
    assert os.path.lexists(out / rel) and (out / "d1/d2/c.bin").read_text() == "ours"


def test_overwrite_keeps_a_users_empty_folder(tmp_path):
    out = tmp_path / "f"
    with claim(out, OWNER, {"v": 1}) as c:
        c.path("parts/a.arrow").write_text("x")
    (out / "mine").mkdir()
    with claim(out, OWNER, {"v": 2}, overwrite=True):
        pass
    assert (out / "mine").is_dir() and not (out / "parts").exists()
