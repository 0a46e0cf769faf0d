"""Issue 17, item 8 for ``train``: the run folder is ``affpipe train``'s own
(``affpipe.run.claim``).

A user's ``config.json`` (or any file a run does not write) is refused and untouched, a symlink
is never followed, ``--resume`` continues only a run of the same config and data, ``--overwrite``
deletes only the run's files, two runs never write at once, only rank 0 claims, and a 0.2 run (no
marker) resumes when its ``last.pt`` loads as an affpipe checkpoint made from the config and data
given. Issue 24: nothing a run produced is deleted without ``--overwrite`` (a missing ``last.pt``
is a finished or resumable run); only a run that never reached a step is reused."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from affpipe.cli import main
from affpipe.outdir import LOCK, MARKER, check_folder, folder_lock, read_marker
from affpipe.run.checkpoint import load_checkpoint, read_metrics
from affpipe.run.claim import RUN_OWNER, legacy_run
from affpipe.run.config import load_config

TINY = ["--task", "va", "--epochs", "1", "--image-size", "32", "--batch-size", "16", "--max-steps-per-epoch", "2",
        "--max-val-steps", "3", "--num-workers", "0", "--backend", "torch", "--device", "cpu", "--log-every", "1"]


def _train(shards: Path, out: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["train", *TINY, "--shards", str(shards), "-o", str(out), *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _one_error(output: str) -> str:
    errors = [seg for seg in re.split(r"[\r\n]", output) if "Error:" in seg]
    assert len(errors) == 1 and errors[0].startswith("Error:"), output[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def run(shard_dir, tmp_path_factory) -> Path:
    """A finished one-epoch run (never changed by the tests: they copy it)."""
    out = tmp_path_factory.mktemp("runfolder") / "run"
    code, output = _train(shard_dir, out)
    assert code == 0, output[-2000:]
    return out


def _copy(run: Path, tmp: Path) -> Path:
    shutil.copytree(run, tmp / "run")
    (tmp / "run" / LOCK).unlink(missing_ok=True)
    return tmp / "run"


def test_run_owner_covers_what_train_and_evaluate_write(run):
    check_folder(run, RUN_OWNER)  # every file the run wrote is one of its names
    assert read_marker(run)["command"] == "train"
    for name in ("config.json", "lineage.json", "metrics.jsonl", "last.pt", "best.pt", "last.pt.tmp", "curves.png",
                 "eval.json", "eval.md", "eval_train.json", "eval_smoothed.md", "au_thresholds.json",
                 "smoothing.json", "eval_predictions.npz", "eval_smoothed_cv_predictions.npz",
                 "events.out.tfevents.1733.host.42.0"):
        assert RUN_OWNER.owns(name), name
    for name in ("thesis.txt", "notes.md", "config.toml", "other.pt", "data/x.json"):
        assert not RUN_OWNER.owns(name), name


def test_a_users_config_json_is_refused_and_untouched(shard_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("my settings, not JSON\n")
    for extra in ((), ("--resume",)):  # --resume never reads it as the run's config either
        code, output = _train(shard_dir, out, *extra)
        assert code == 1 and "not empty and not written by `affpipe train`" in _one_error(output), output
        assert (out / "config.json").read_text() == "my settings, not JSON\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_a_finished_run_is_not_restarted_and_foreign_files_stop_everything(run, shard_dir, tmp_path):
    out = _copy(run, tmp_path)
    code, output = _train(shard_dir, out)
    assert code == 1 and "already holds a run (last.pt)" in _one_error(output) and "--overwrite" in output
    (out / "thesis.txt").write_text("x")
    for extra in ((), ("--resume", "--epochs", "2"), ("--overwrite",)):
        code, output = _train(shard_dir, out, *extra)
        assert code == 1 and "did not write (thesis.txt)" in _one_error(output), (extra, output)
    assert (out / "thesis.txt").read_text() == "x"
    assert (out / "last.pt").read_bytes() == (run / "last.pt").read_bytes()


def test_a_symlink_in_the_run_folder_is_never_followed(run, shard_dir, tmp_path):
    out, elsewhere = _copy(run, tmp_path), tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "plot.png").write_bytes(b"mine")
    (out / "curves.png").unlink()
    (out / "curves.png").symlink_to(elsewhere / "plot.png")
    code, output = _train(shard_dir, out, "--resume", "--epochs", "2")
    assert code == 1 and "curves.png (symlink)" in _one_error(output)
    assert (elsewhere / "plot.png").read_bytes() == b"mine"


def test_overwrite_deletes_only_the_runs_files_and_excludes_resume(run, shard_dir, tmp_path):
    out = _copy(run, tmp_path)
    code, output = _train(shard_dir, out, "--overwrite", "--resume")
    assert code == 1 and "--resume and --overwrite exclude each other" in _one_error(output)
    old = load_checkpoint(out / "last.pt")["wall_time"]
    code, output = _train(shard_dir, out, "--overwrite", "--seed", "3")
    assert code == 0, output[-2000:]
    last = load_checkpoint(out / "last.pt")
    assert last["config"]["seed"] == 3 and last["wall_time"] != old
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"] == [1, 2]


def test_resume_with_other_data_is_one_line_naming_both_sides(run, shard_dir, tmp_path):
    out = _copy(run, tmp_path)
    other = tmp_path / "shards"
    shutil.copytree(shard_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64  # other bytes than the run trained on
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, output = _train(other, out, "--resume", "--epochs", "2")
    line = _one_error(output)
    assert code == 1 and "other inputs (data:" in line and "(in the folder) vs" in line and "--overwrite" in line
    assert (out / "last.pt").read_bytes() == (run / "last.pt").read_bytes()


def test_a_run_stopped_after_steps_before_its_first_checkpoint_is_refused_not_wiped(run, shard_dir, tmp_path):
    out = _copy(run, tmp_path)
    for name in ("last.pt", "best.pt", "eval.json", "eval.md", "eval_predictions.npz"):
        (out / name).unlink(missing_ok=True)
    stale = (out / "metrics.jsonl").read_text()
    for extra in ((), ("--resume",)):
        code, output = _train(shard_dir, out, *extra)
        assert code == 1 and "stopped at step 2 before its first checkpoint" in _one_error(output), output
        assert (out / "metrics.jsonl").read_text() == stale
    assert _train(shard_dir, out, "--overwrite")[0] == 0
    assert (out / "metrics.jsonl").read_text().count('"kind": "epoch"') == 1


def test_a_run_that_failed_before_its_first_step_is_reused_with_another_batch_size(run, shard_dir, tmp_path):
    """Issue 25: nothing produced, no step logged: the folder is taken again, whatever its config."""
    out = _copy(run, tmp_path)
    for p in list(out.iterdir()):
        if p.name not in (MARKER, "config.json", "lineage.json"):
            p.unlink()
    (out / "metrics.jsonl").write_text(json.dumps({"kind": "init", "epoch": -1, "step": 0}) + "\n")
    code, output = _train(shard_dir, out, "--batch-size", "8")
    assert code == 0, output[-2000:]
    assert load_checkpoint(out / "last.pt")["config"]["batch_size"] == 8


def test_a_finished_run_without_last_pt_is_never_wiped(run, shard_dir, tmp_path):
    """Issue 24: last.pt removed to save space; train refuses, --resume says finished, or
    continues from best.pt (its latest state) with more epochs; nothing is deleted."""
    out = _copy(run, tmp_path)
    (out / "last.pt").unlink()
    (out / "au_thresholds.json").write_text('{"split": "val", "checkpoint": "best.pt", "au_thresholds": {}}')
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != MARKER}
    assert {"best.pt", "eval.json", "metrics.jsonl", "eval_predictions.npz"} <= set(before)
    code, output = _train(shard_dir, out)
    line = _one_error(output)
    assert code == 1 and "already holds a run" in line and "best.pt" in line and "no last.pt" in line
    code, output = _train(shard_dir, out, "--resume")
    assert code == 1 and "is finished" in _one_error(output) and "nothing to resume" in output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name not in (MARKER, LOCK)} == before
    code, output = _train(shard_dir, out, "--resume", "--epochs", "2")
    assert code == 0, output[-2000:]
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"] == [0, 1]


def test_resume_from_a_best_pt_older_than_the_last_checkpoint_is_refused(run, shard_dir, tmp_path):
    out = _copy(run, tmp_path)
    (out / "last.pt").unlink()
    with open(out / "metrics.jsonl", "a") as fh:  # a later epoch, not the best: its last.pt is gone
        fh.write(json.dumps({"kind": "epoch", "epoch": 1, "step": 4}) + "\n")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name not in (MARKER, LOCK)}
    code, output = _train(shard_dir, out, "--resume", "--epochs", "3")
    line = _one_error(output)
    assert code == 1 and "best.pt (step 2)" in line and "last checkpoint was at step 4" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name not in (MARKER, LOCK)} == before


def test_a_temporal_run_without_last_pt_is_never_wiped(copy_world):
    from affpipe.run.config import from_dict
    from affpipe.runs.train import train

    out = copy_world / "runs" / "temporal"
    (out / "last.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name not in (MARKER, LOCK)}
    cfg = from_dict({**json.loads((out / "config.json").read_text()), "out": str(out)})
    with pytest.raises(FileExistsError, match="already holds a run .*best.pt.*no last.pt"):
        train(cfg)
    # (the session's temporal run kept its start: best.pt is step 0, its last checkpoint later)
    with pytest.raises(FileExistsError, match="is finished|is not the state to continue"):
        train(from_dict({**json.loads((out / "config.json").read_text()), "out": str(out), "resume": True}))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name not in (MARKER, LOCK)} == before


def test_a_second_train_into_a_busy_run_folder_is_refused(run, shard_dir, tmp_path):
    out = _copy(run, tmp_path)
    with folder_lock(out, LOCK, "affpipe train"):  # another run writing into it
        code, output = _train(shard_dir, out, "--resume", "--epochs", "2")
    assert code == 1 and "busy" in _one_error(output)


def test_only_rank_0_claims(shard_dir, tmp_path):
    from affpipe.dist import DistContext
    from affpipe.runs.kinds import kind_of
    from affpipe.train.loop import prepare_run_dir

    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("mine\n")
    cfg = load_config(None, {"task": "va", "shards": shard_dir, "out": out})
    with contextlib.ExitStack() as held:  # rank 1 neither checks nor writes: rank 0 refuses for all
        assert prepare_run_dir(cfg, kind_of(cfg), DistContext(1, 2, torch.device("cpu")), held) == out
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    with contextlib.ExitStack() as held, pytest.raises(FileExistsError, match="not written by `affpipe train`"):
        prepare_run_dir(cfg, kind_of(cfg), DistContext(0, 2, torch.device("cpu")), held)


def test_a_run_of_affpipe_0_2_resumes_a_lookalike_does_not(run, shard_dir, tmp_path):
    out = _copy(run, tmp_path)
    (out / MARKER).unlink()  # as 0.2 left it: no marker
    assert legacy_run(out)
    code, output = _train(shard_dir, out)
    assert code == 1 and "older affpipe" in _one_error(output) and "--resume" in output
    code, output = _train(shard_dir, out, "--resume", "--epochs", "2")
    assert code == 0, output[-2000:]
    assert read_marker(out)["command"] == "train" and load_checkpoint(out / "last.pt")["epoch"] == 2
    fake = tmp_path / "fake"
    fake.mkdir()  # (a user's lookalike)
    (fake / "config.json").write_text((run / "config.json").read_text())
    (fake / "last.pt").write_text("epoch 3: 0.41\n")  # a user's notes under a run's name
    assert not legacy_run(fake)
    code, output = _train(shard_dir, fake, "--resume", "--epochs", "2")
    assert code == 1 and "not written by `affpipe train`" in _one_error(output)
    assert (fake / "last.pt").read_text() == "epoch 3: 0.41\n" and not (fake / MARKER).exists()


def test_a_0_2_run_of_other_data_or_config_is_not_adopted(run, shard_dir, tmp_path):
    """Issue 24: adoption checks what last.pt was made from, not only the names in the folder."""
    out = _copy(run, tmp_path)
    (out / MARKER).unlink()
    other = tmp_path / "shards"
    shutil.copytree(shard_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, output = _train(other, out, "--resume", "--epochs", "2")
    line = _one_error(output)
    assert code == 1 and "older affpipe" in line and "data:" in line and "(its lineage) !=" in line, line
    assert not (out / MARKER).exists()
    code, output = _train(shard_dir, out, "--resume", "--epochs", "2", "--lr", "0.5")
    line = _one_error(output)
    assert code == 1 and "older affpipe" in line and "lr: 0.001 (checkpoint) != 0.5 (now)" in line, line
    assert not (out / MARKER).exists()
    assert (out / "last.pt").read_bytes() == (run / "last.pt").read_bytes()
