"""The command line's one error path: every subcommand, given an empty folder or a missing path,
prints one ``Error:`` line, exits non-zero and shows no traceback (``--debug`` shows it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from affpipe.cli import main

# Each command with its inputs pointing at EMPTY (an empty folder) or MISSING (no such path);
# outputs go under OUT.
CASES = {
    "index-empty": ["index", "{EMPTY}", "-o", "{OUT}/i"],
    "index-missing": ["index", "{MISSING}", "-o", "{OUT}/i"],
    "stats-empty": ["stats", "{EMPTY}", "-o", "{OUT}/s"],
    "stats-missing": ["stats", "{MISSING}", "-o", "{OUT}/s"],
    "shard-empty": ["shard", "{EMPTY}", "-o", "{OUT}/sh"],
    "shard-missing": ["shard", "{MISSING}", "-o", "{OUT}/sh"],
    "verify-empty": ["verify", "{EMPTY}"],
    "verify-missing": ["verify", "{MISSING}"],
    "show-empty": ["show", "{EMPTY}", "-o", "{OUT}/g.png"],
    "show-missing": ["show", "{MISSING}", "-o", "{OUT}/g.png"],
    "train-empty": ["train", "--task", "va", "--shards", "{EMPTY}", "-o", "{OUT}/run"],
    "train-missing": ["train", "--task", "va", "--shards", "{MISSING}", "-o", "{OUT}/run"],
    "train-resume-missing": ["train", "--task", "va", "--shards", "{EMPTY}", "-o", "{MISSING}", "--resume"],
    "evaluate-empty": ["evaluate", "{EMPTY}", "--shards", "{EMPTY}"],
    "evaluate-missing": ["evaluate", "{MISSING}", "--shards", "{EMPTY}"],
    "predict-empty": ["predict", "{EMPTY}", "--shards", "{EMPTY}", "-o", "{OUT}/p"],
    "predict-missing": ["predict", "{MISSING}", "--shards", "{EMPTY}", "-o", "{OUT}/p"],
    "report-empty": ["report", "{EMPTY}", "-o", "{OUT}/r"],
    "report-missing": ["report", "{MISSING}", "-o", "{OUT}/r"],
    "experiments-empty": ["experiments", "--shards", "{EMPTY}", "-o", "{OUT}/e", "--only", "uni_va"],
    "experiments-missing": ["experiments", "--shards", "{MISSING}", "-o", "{OUT}/e"],
    "experiments-grid-missing": ["experiments", "--grid", "{MISSING}", "-o", "{OUT}/e"],
    "embed-empty": ["embed", "{EMPTY}", "--shards", "{EMPTY}", "-o", "{OUT}/f"],
    "embed-missing": ["embed", "{MISSING}", "--shards", "{EMPTY}", "-o", "{OUT}/f"],
    "train-features-empty": ["train", "--task", "mtl", "--features", "{EMPTY}", "-o", "{OUT}/run"],
    "evaluate-temporal-empty": ["evaluate", "{EMPTY}", "--tune-smoothing"],
    "crop-missing": ["crop", "{MISSING}", "-o", "{OUT}/tree"],
    "pretrain-empty": ["pretrain", "--shards", "{EMPTY}", "-o", "{OUT}/run", "--device", "cpu"],
    "pretrain-missing": ["pretrain", "--shards", "{MISSING}", "-o", "{OUT}/run"],
    "crop-empty": ["crop", "{EMPTY}", "-o", "{OUT}/tree"],
    "export-empty": ["export", "{EMPTY}", "-o", "{OUT}/m.safetensors"],
    "export-missing": ["export", "{MISSING}", "-o", "{OUT}/m.safetensors"],
    "predict-video-empty-run": ["predict", "{EMPTY}", "--video", "{MISSING}", "-o", "{OUT}/p"],
}


def _args(case: str, tmp_path: Path) -> list[str]:
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    subs = {"{EMPTY}": str(empty), "{MISSING}": str(tmp_path / "missing"), "{OUT}": str(tmp_path / "out")}
    out = []
    for a in CASES[case]:
        for k, v in subs.items():
            a = a.replace(k, v)
        out.append(a)
    return out


def test_every_subcommand_has_a_case():
    covered = {args[0] for args in CASES.values()}
    inputs_free = {"synth", "bench", "bench-full"}  # they only write an output folder
    assert set(main.commands) - inputs_free <= covered, set(main.commands) - inputs_free - covered


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line(case, tmp_path):
    res = CliRunner().invoke(main, _args(case, tmp_path))
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    assert len(errors[0]) > len("Error: ") + 10  # says what was wrong
    assert not (tmp_path / "empty").iterdir().__next__() if any((tmp_path / "empty").iterdir()) else True


def test_debug_shows_the_traceback(tmp_path):
    res = CliRunner().invoke(main, ["--debug", *_args("verify-empty", tmp_path)])
    assert res.exit_code != 0 and isinstance(res.exception, FileNotFoundError)


def test_help_of_every_subcommand_exits_zero():
    runner = CliRunner()
    for name in [None, *main.commands]:
        res = runner.invoke(main, [name, "--help"] if name else ["--help"])
        assert res.exit_code == 0 and "Error" not in res.output, (name, res.output)
