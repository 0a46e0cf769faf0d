"""affpipe.experiments.report on tiny fake run folders that follow the run-folder contract (DESIGN.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import fake_run

from affpipe.experiments.report import ReportConfig, write_report
from affpipe.experiments.runs import convergence, load_run, read_curve, run_label
from affpipe.labels import AU_NAMES, EXPR_CLASSES
from affpipe.scoring.bootstrap import fmt_ci


@pytest.fixture()
def runs(tmp_path) -> list[Path]:
    r = tmp_path / "runs"
    return [
        fake_run(r, "uni_va", "va", seed=1, predictions=True, skill=0.5),
        fake_run(r, "uni_va_mse", "va", va_loss="mse", seed=2, predictions=True, skill=0.4),
        fake_run(r, "uni_expr", "expr", seed=3, predictions=True, skill=0.3),
        fake_run(r, "uni_au", "au", seed=4, predictions=True, skill=0.5),
        fake_run(r, "mtl_random", "mtl", seed=5, predictions=True, skill=0.6),
        fake_run(r, "mtl_from_uni_va", "mtl", init=str(r / "uni_va" / "best.pt"), weighting="uncertainty", seed=6,
                 predictions=True, skill=0.6),
        fake_run(r, "mtl_imagenet", "mtl", init="imagenet", seed=7, predictions=True, skill=0.95),
    ]


def _table_after(md: str, heading: str) -> list[list[str]]:
    """Rows (cells) of the first markdown table after ``heading``."""
    body = md.split(heading, 1)[1]
    rows = [ln for ln in body.splitlines() if ln.startswith("|")]
    block = []
    for ln in body.splitlines()[body.splitlines().index(rows[0]):]:
        if not ln.startswith("|"):
            break
        block.append([c.strip() for c in ln.strip("|").split("|")])
    return block[2:]  # drop header and alignment rows


def test_run_kind_from_config(runs):
    k = load_run(runs[5]).kind
    assert (k.task, k.init, k.va_loss, k.task_weighting, k.mtl) == ("mtl", "uni_va", "ccc", "uncertainty", True)
    assert "init uni_va" in k.label() and "uncertainty" in k.label()
    k = run_label(json.loads((runs[1] / "config.json").read_text()))
    assert (k.task, k.va_loss, k.expr_weighted, k.task_weighting) == ("va", "mse", None, None)


def test_read_curve_tolerant(tmp_path, runs):
    curve = read_curve(runs[3] / "metrics.jsonl")
    assert [p["epoch"] for p in curve] == [0, 1, 2, 3] and "au_f1" in curve[0]
    assert "frames" not in curve[0] and "time_s" not in curve[0]  # val_frames is not a metric
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"kind": "epoch", "epoch": 0, "val": {"va_ccc": 0.1}, "wall_time": 1}\n'
                   '{"kind": "epoch", "epoch": 0, "val": {"va_ccc": 0.2}}\n{"epo')
    assert read_curve(bad) == [{"epoch": 0, "wall_time": None, "va_ccc": 0.2}]  # resumed epoch: last wins
    assert read_curve(tmp_path / "missing.jsonl") == []


def test_convergence():
    curve = [{"epoch": e, "wall_time": 10.0 * (e + 1), "s": s} for e, s in enumerate([0.1, 0.5, 0.95, 1.0, 0.9])]
    c = convergence(curve, "s", 0.9)
    assert (c["best"], c["best_epoch"], c["epochs"], c["wall_time"], c["total_epochs"]) == (1.0, 4, 3, 30.0, 5)
    assert convergence([{"epoch": 0, "s": -0.2}], "s")["epochs"] is None  # no meaningful 90% of a negative best
    assert convergence([], "s")["best"] is None


def test_uni_vs_mtl_differences(runs):
    from affpipe.experiments.compare import Resampler, group_cells, uni_vs_mtl_rows
    from affpipe.scoring import bootstrap as bs

    loaded = [load_run(p) for p in runs]
    rs = Resampler(loaded, resamples=300)
    rows = uni_vs_mtl_rows(group_cells(loaded), rs)
    ev = {r.name: r.eval for r in loaded}
    best_va = max(ev["uni_va"]["va_ccc"], ev["uni_va_mse"]["va_ccc"])
    got = {(r["who"], r["metric"]): r for r in rows}
    assert [w for w, m in got if m == "p_mtl"] == ["`mtl_random`", "`mtl_from_uni_va`", "`mtl_imagenet`"]
    assert got[("`mtl_random`", "va_ccc")]["b"] == pytest.approx(best_va)
    p_uni = best_va + ev["uni_expr"]["expr_f1"] + ev["uni_au"]["au_f1"]
    r = got[("`mtl_random`", "p_mtl")]
    assert r["b"] == pytest.approx(p_uni) and r["diff"] == pytest.approx(ev["mtl_random"]["p_mtl"] - p_uni)
    # The interval: the same resampled videos for the multi-task model and each uni-task model.
    stats = {n: bs.video_stats(*bs.load_predictions(p / "eval_predictions.npz")) for n, p in
             ((p.name, p) for p in runs)}
    w = bs.point_and_resamples(8, 300, 0)
    best = "uni_va" if ev["uni_va"]["va_ccc"] >= ev["uni_va_mse"]["va_ccc"] else "uni_va_mse"
    uni = (bs.metrics_from_stats(stats[best], w)["va_ccc"] + bs.metrics_from_stats(stats["uni_expr"], w)["expr_f1"]
           + bs.metrics_from_stats(stats["uni_au"], w)["au_f1"])
    want = bs.difference(bs.metrics_from_stats(stats["mtl_random"], w)["p_mtl"], uni)
    assert r["ci"] == pytest.approx(want["ci"])


def test_report_tables_figures_and_values(tmp_path, runs):
    out = tmp_path / "report"
    md_path = write_report(ReportConfig(runs=tuple(runs), out=out, notes=("mtl_imagenet skipped: offline",)))
    md = md_path.read_text()
    # The first table is the uni vs multi-task answer.
    first_heading = re.findall(r"^## (.+)$", md, re.M)
    assert first_heading[:3] == ["Multi-task vs uni-task", "Initialization", "Loss variants and task weighting"]
    assert md.index("| model |") < md.index("| run |")
    for h in ("Every run", "EXPR F1 per class", "AU F1 per action unit", "Training curves", "Convergence speed", "Notes"):
        assert f"## {h}" in md
    for png in ("uni_vs_mtl.png", "curves_epoch.png", "curves_time.png"):
        assert (out / png).stat().st_size > 10_000 and f"]({png})" in md
    # Every run's metrics in the report equal its eval.json, with the interval evaluate stored.
    rows = {r[0].strip("`"): r for r in _table_after(md, "## Every run")}
    assert set(rows) == {p.name for p in runs}
    cols = ["va_ccc", "valence_ccc", "arousal_ccc", "expr_f1", "au_f1", "p_mtl"]
    for p in runs:
        ev = json.loads((p / "eval.json").read_text())
        for i, key in enumerate(cols):
            cell = rows[p.name][2 + i]
            assert cell == (fmt_ci(ev[key], ev["ci"][key]) if key in ev else "—"), (p.name, key)
    # Each question's table ends with one sentence its numbers support.
    for heading, topic in (("## Multi-task vs uni-task", "Multi-task vs uni-task"), ("## Initialization", "Initialization"),
                           ("## Loss variants and task weighting", "Loss variants and task weighting")):
        after = md.split(heading, 1)[1].split("\n## ")[0]
        last = [ln for ln in after.splitlines() if ln.strip() and not ln.startswith("![")][-1]
        assert last.startswith(f"**{topic}:**") and ("no difference holds at this size" in last or "[" in last)
        assert "Multiplicity:" in last
    loss = {(r[0], r[2]): r for r in _table_after(md, "## Loss variants and task weighting")}
    assert ("`uni_va_mse`", "VA CCC") in loss and loss[("`uni_va_mse`", "VA CCC")][1] == "`uni_va`"
    init = {(r[0], r[2]): r for r in _table_after(md, "## Initialization")}
    assert ("`mtl_from_uni_va`", "P_MTL") not in init  # two settings differ from mtl_random: no single-cause pair
    assert init[("`mtl_imagenet`", "P_MTL")][1] == "`mtl_random`"
    # A much better model: the sentence names the difference and its interval, which excludes 0.
    # One seed per cell: a model-vs-model statement, never a recipe finding.
    assert ("**Initialization:** this model `mtl_imagenet` vs that model `mtl_random` (one seed: says nothing about "
            "the recipes): VA CCC +") in md
    # Per-class table: each cell equals the run's per-class F1.
    per = _table_after(md, "## EXPR F1 per class")
    ev = json.loads((runs[2] / "eval.json").read_text())["expr_f1_per_class"]
    header_runs = ["uni_expr", "mtl_random", "mtl_from_uni_va", "mtl_imagenet"]
    for row in per:
        assert row[1 + header_runs.index("uni_expr")].strip("*") == f"{ev[row[0]]:.4f}"
    assert [r[0] for r in per] == list(EXPR_CLASSES)
    assert [r[0] for r in _table_after(md, "## AU F1 per action unit")] == list(AU_NAMES)
    # Headline differences match eval.json, with their paired intervals.
    head = {r[0].split("`")[1] if "`" in r[0] else r[0]: r for r in _table_after(md, "## Multi-task vs uni-task")}
    ev_m = json.loads((runs[4] / "eval.json").read_text())
    ev_u = json.loads((runs[2] / "eval.json").read_text())
    assert head["mtl_random"][3] == f"{ev_m['expr_f1']:.4f}"
    assert head["mtl_random"][4].startswith(f"{ev_m['expr_f1'] - ev_u['expr_f1']:+.3f} [")
    # Convergence: curves rise linearly to the final value over 4 epochs → 90% reached at epoch 4.
    conv = {r[0].strip("`"): r for r in _table_after(md, "## Convergence speed")}
    assert conv["uni_va"][5] == "4" and conv["uni_va"][6] == "50.0"
    summary = json.loads((out / "report.json").read_text())
    assert summary["runs"]["uni_au"]["eval"] == json.loads((runs[3] / "eval.json").read_text())


def test_report_cli_expands_parent_and_skips_unfinished(tmp_path, runs):
    from affpipe.cli import main

    (runs[0].parent / "half_done").mkdir()
    (runs[0].parent / "half_done" / "config.json").write_text(json.dumps({"task": "va"}))
    res = CliRunner().invoke(main, ["report", str(runs[0].parent), "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert "`half_done` left out" in md or "half_done" in md.split("## Notes")[1]
    res = CliRunner().invoke(main, ["report", str(tmp_path / "nothing"), "-o", str(tmp_path / "r2")])
    assert res.exit_code != 0


def test_report_uni_only(tmp_path):
    run = fake_run(tmp_path, "uni_va", "va")
    md = write_report(ReportConfig(runs=(run,), out=tmp_path / "o")).read_text()
    assert "No multi-task runs among the inputs." in md and "## Every run" in md


def test_report_two_runs_prints_paired_differences(tmp_path):
    from affpipe.cli import main

    r = tmp_path / "runs"
    a = fake_run(r, "a", "mtl", seed=1, predictions=True, skill=0.9)
    b = fake_run(r, "b", "mtl", seed=2, predictions=True, skill=0.3)
    res = CliRunner().invoke(main, ["report", str(a), str(b), "--resamples", "300"])
    assert res.exit_code == 0, res.output
    ev_a, ev_b = (json.loads((p / "eval.json").read_text()) for p in (a, b))
    line = next(ln for ln in res.output.splitlines() if ln.strip().startswith("P_MTL"))
    assert f"{ev_a['p_mtl']:.4f} vs {ev_b['p_mtl']:.4f}: {ev_a['p_mtl'] - ev_b['p_mtl']:+.3f} [" in line
    assert line.endswith("(excludes 0, holds after Holm)")
    assert "paired bootstrap over the same 8 validation recordings" in res.output
    assert not (tmp_path / "report.md").exists()  # without -o: printed only
    # A uni-task run and a multi-task run share VA CCC only.
    u = fake_run(r, "u", "va", seed=3, predictions=True)
    res = CliRunner().invoke(main, ["report", str(u), str(a), "--resamples", "100"])
    assert res.exit_code == 0 and "VA CCC" in res.output and "EXPR F1" not in res.output


def test_report_refuses_runs_of_different_splits_or_without_predictions(tmp_path):
    from affpipe.cli import main

    r = tmp_path / "runs"
    a = fake_run(r, "a", "mtl", seed=1, predictions=True)
    b = fake_run(r, "b", "mtl", seed=2, predictions=True, videos=6)  # another validation split
    res = CliRunner().invoke(main, ["report", str(a), str(b)])
    assert res.exit_code == 1
    err = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(err) == 1 and "not evaluated on the same split (row ids or videos differ)" in err[0]
    c = fake_run(r, "c", "mtl", seed=3)  # an old run folder: no predictions kept
    res = CliRunner().invoke(main, ["report", str(a), str(c)])
    assert res.exit_code == 1 and "kept no predictions" in res.output and "affpipe evaluate" in res.output
    # In a report of many runs, the odd one is left out of the paired comparisons with a note.
    md = write_report(ReportConfig(runs=(a, b, c), out=tmp_path / "o")).read_text()
    assert "`b` left out of the paired comparisons: row ids or videos differ" in md
