"""experiments.compare: a left-out run never sets the fingerprints; report.md and stdout agree."""

from __future__ import annotations

from click.testing import CliRunner
from support import fake_run

from affpipe.experiments.compare import Resampler, sentence
from affpipe.experiments.report import ReportConfig, write_report
from affpipe.experiments.runs import load_run


def test_a_left_out_run_does_not_set_the_fingerprints(tmp_path):
    r = tmp_path / "runs"
    uni = fake_run(r, "uni", "va", seed=1, predictions=True)
    bad = fake_run(r, "bad", "mtl", seed=2, predictions=True, videos=6)  # another split: left out
    good = fake_run(r, "good", "mtl", seed=3, predictions=True)
    for order in ((uni, bad, good), (uni, good, bad), (bad, uni, good)):
        rs = Resampler([load_run(p) for p in order], resamples=20)
        kept = {name for name, _ in rs.stats}
        # the split most runs share is the reference, whatever the argument order
        assert kept == {"uni", "good"}, order
        assert rs.notes == ["`bad` left out of the paired comparisons: row ids or videos differ from `uni/eval_predictions.npz`"] \
            or rs.notes == ["`bad` left out of the paired comparisons: row ids or videos differ from `good/eval_predictions.npz`"]


def test_report_md_and_stdout_agree_in_sign_and_interval(tmp_path):
    from affpipe.cli import main

    r = tmp_path / "runs"
    u = fake_run(r, "u", "va", seed=3, predictions=True, skill=0.3)
    m = fake_run(r, "m", "mtl", seed=1, predictions=True, skill=0.9)
    res = CliRunner().invoke(main, ["report", str(u), str(m), "--resamples", "300"])
    assert res.exit_code == 0, res.output
    assert "m − u (multi-task − uni-task, as in report.md)" in res.output
    line = next(ln for ln in res.output.splitlines() if ln.strip().startswith("VA CCC"))
    printed = line.split(": ", 1)[1].split(" (")[0]
    md = write_report(ReportConfig(runs=(u, m), out=tmp_path / "o", resamples=300)).read_text()
    head = md.split("## Multi-task vs uni-task", 1)[1].split("\n## ")[0]
    row = next(ln for ln in head.splitlines() if ln.startswith("| `m`"))
    assert row.split("|")[3].strip() == printed  # the same Δ and interval, MTL − uni in both
    assert "no intervals" not in head  # one uni-task model is enough for its task's interval
    assert "VA 8" in md and "Multiplicity" in md


def test_sentence_says_why_there_is_no_interval():
    rows = [{"who": "`a`", "ref": "`b`", "metric": "va_ccc", "diff": 0.1, "ci": None, "excludes_zero": False,
             "why": "no kept predictions"}]
    assert "rerun `affpipe evaluate`" in sentence("T", rows, 1, 8)
    assert "scored on 1 recording" in sentence("T", rows, 1, 1)
    held = [{"who": "`a`", "ref": "`b`", "metric": "va_ccc", "diff": 0.1, "ci": [0.05, 0.15], "excludes_zero": True,
             "p": 0.001, "seeds": 3}]
    assert "recipe `a` over `b` (seeds resampled): VA CCC +0.100" in sentence("T", held, 3, 8)
    held[0]["seeds"] = 1
    assert "this model `a` vs that model `b`" in sentence("T", held, 1, 8)
