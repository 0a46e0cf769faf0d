"""``affpipe report``: the research questions answered from run folders, as markdown + PNGs.

Reads the run folders (``experiments.runs``), answers each research question with paired
differences and their 95% intervals over the same resampled validation videos
(``experiments.compare``), and writes ``report.md`` (each question's table ends with the one
sentence its numbers support), every run's metrics with intervals, per-class / per-AU F1,
overlaid training curves and convergence speed. ``report.json`` holds the same numbers unrounded.
``affpipe report RUN_A RUN_B`` also prints the paired difference of the two runs.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from affpipe.experiments.compare import (
    MAIN_METRICS,
    Resampler,
    best_uni,
    compare,
    group_cells,
    seeds_of,
    sentence,
    spread,
    temporal_rows,
    uni_side,
    uni_vs_mtl_rows,
    variant_rows,
)
from affpipe.experiments.runs import (
    METRIC_LABEL,
    TASK_METRIC,
    TASK_NAME,
    RunSummary,
    convergence,
    expand_runs,
    fmt,
    load_run,
    md_table,
)
from affpipe.io import atomic_write_text
from affpipe.labels import AU_NAMES, EXPR_CLASSES
from affpipe.outdir import Owner, claim
from affpipe.scoring.bootstrap import fmt_ci
from affpipe.scoring.intervals import multiplicity, multiplicity_line

log = logging.getLogger(__name__)

CURVE_METRICS = ("va_ccc", "expr_f1", "au_f1", "p_mtl")
OWNER = Owner("report", ("report.md", "report.json", "uni_vs_mtl.png", "curves_epoch.png", "curves_time.png"))


@dataclass(frozen=True)
class ReportConfig:
    """What ``affpipe report`` reads and where it writes."""

    runs: tuple[Path, ...]
    out: Path
    title: str = "affpipe experiments"
    converge_frac: float = 0.9  # convergence = first epoch reaching this share of the best score
    notes: tuple[str, ...] = ()  # extra lines for the report (e.g. runs skipped by experiments)
    resamples: int = 2000  # bootstrap resamples of the validation videos
    seed: int = 0  # of the resamples


def _diff(r: dict) -> str:
    return fmt_ci(r["diff"], r["ci"], signed=True)


def _question(title: str, intro: str, header: list[str], body: list[list[str]], rows: list[dict],
              cells, rs: Resampler, topic: str) -> list[str]:
    if not body:
        return []
    weak = rs.underpowered()  # said in the question's own sentence, where its conclusion is read
    return [f"## {title}", "", intro, "", *md_table(header, body),
            sentence(topic, rows, seeds_of(cells), rs.videos) + (f" {weak}" if weak else ""), ""]


def _headline(cells, rs: Resampler) -> list[str]:
    rows = uni_vs_mtl_rows(cells, rs)
    uni = best_uni(cells)
    lines = ["## Multi-task vs uni-task", ""]
    if not any(uni.values()):
        lines += ["No uni-task runs among the inputs: nothing to compare against.", ""]
    if not rows:
        lines += ["No multi-task runs among the inputs.", ""]
    if not rows or not any(uni.values()):
        return lines
    _, point_u = uni_side(rs, uni)
    header = ["model"] + [x for m in MAIN_METRICS for x in (METRIC_LABEL[m], "Δ [95% CI]")]
    body = [["uni-task (best per task)"] + [x for m in MAIN_METRICS for x in (fmt(point_u[m]), "")]]
    by_cell: dict[str, list[dict]] = {}
    for r in rows:
        by_cell.setdefault(r["who"], []).append(r)
    for who, rs_ in by_cell.items():
        body.append([who] + [x for r in rs_ for x in (fmt(r["a"]), _diff(r))])
    uni_names = ", ".join(f"{TASK_NAME[t]}: `{c.name}`" for t, c in uni.items() if c)
    return lines + _question(
        "", "Each task's validation metric for the best uni-task model of that task and for every multi-task "
        "model; Δ = MTL − uni (positive: multi-task is better). The uni-task P_MTL is the sum of the three "
        f"uni-task models' scores (three networks vs one). Uni-task reference runs — {uni_names or 'none'}.",
        header, body, rows, cells, rs, "Multi-task vs uni-task")[2:]


def _temporal(cells, rs: Resampler) -> list[str]:
    rows = temporal_rows(cells, rs)
    header = ["model"] + [x for m in MAIN_METRICS for x in (METRIC_LABEL[m], "Δ [95% CI]")]
    body: list[list[str]] = []
    seen: list[str] = []
    for src in dict.fromkeys(r["ref"] for r in rows):
        src_cell = next(c for c in cells if f"`{c.name}` per-frame" == src)
        body.append([src] + [x for m in MAIN_METRICS for x in (fmt(src_cell.mean(m)), "")])
        for r in rows:
            if r["ref"] == src and r["who"] not in seen:
                seen.append(r["who"])
                body.append([r["who"]] + [x for q in rows if q["who"] == r["who"] for x in (fmt(q["a"]), _diff(q))])
    return _question(
        "Temporal context: per-frame vs smoothing vs temporal heads",
        "Validation metrics of a per-frame run, of the same checkpoint with per-video smoothing, and of temporal "
        "heads trained on that run's frame features (`affpipe embed`); Δ = row − per-frame. Smoothing tuned on "
        "val is scored on the split it was tuned on (optimistic: window 1 = none is a candidate, so it never "
        "lowers a score there); cross-validated smoothing is tuned on half of the videos and scored on the other "
        "half, both ways (honest).", header, body, rows, cells, rs, "Temporal context")


def _variants(cells, rs: Resampler, question: str, title: str, intro: str) -> list[str]:
    rows = variant_rows(cells, rs, question)
    header = ["run", "reference", "metric", "run value", "reference value", "Δ [95% CI]"]
    body = [[r["who"], r["ref"], METRIC_LABEL[r["metric"]], fmt(r["a"]), fmt(r["b"]), _diff(r)] for r in rows]
    return _question(title, intro, header, body, rows, cells, rs, title)


def _multiplicity(cells, rs: Resampler) -> list[str]:
    """The report-wide count: every interval of every question, Holm-adjusted together."""
    rows = [dict(r) for r in (*uni_vs_mtl_rows(cells, rs), *temporal_rows(cells, rs), *variant_rows(cells, rs, "init"),
                              *variant_rows(cells, rs, "loss")) if not r.get("optimistic")]
    line = multiplicity_line(multiplicity(rows))
    if not line:
        return []
    return ["## Multiplicity", "", line.replace("Multiplicity: ", "Over the whole report: ") + " Each question's "
            "sentence adjusts over its own table; a difference that holds only there is weaker than one that holds "
            "here.", ""]


def _seeds(cells) -> list[str]:
    if seeds_of(cells) < 2:
        return []
    header = ["cell", "seeds", *(METRIC_LABEL[m] for m in MAIN_METRICS)]
    body = [[f"`{c.name}`", str(len(c.runs)), *(spread(c, m) for m in MAIN_METRICS)] for c in cells]
    return ["## Seeds", "", "Each cell's validation metrics over its seeds: mean ± standard deviation across seeds "
            "(the seed moves initialization, shard order, augmentation and dropout). The comparisons above resample "
            "the seeds as well as the recordings (two levels), so this spread is inside their intervals.", "",
            *md_table(header, body)]


def _metrics_table(runs: Sequence[RunSummary]) -> list[str]:
    metrics = ("va_ccc", "valence_ccc", "arousal_ccc", "expr_f1", "au_f1", "p_mtl")
    header = ["run", "kind", *(METRIC_LABEL[m] for m in metrics), "videos with labels", "epochs", "wall time (s)"]
    rows = []
    for r in runs:
        conv = convergence(r.curve, r.score_metric)
        ci = r.eval.get("ci") or {}
        start = " (best is the start: no step improved)" if r.kind.temporal and r.eval.get(
            "best_is_start", r.eval.get("step") == 0) else ""
        rows.append([f"`{r.name}`{start}", r.kind.label(),
                     *(fmt_ci(r.eval[m], ci.get(m)) if isinstance(r.eval.get(m), float | int) else "—" for m in metrics),
                     _videos(r.eval), str(conv["total_epochs"] or r.config.get("epochs", "—")),
                     fmt(conv["total_wall_time"]).rsplit(".", 1)[0] if conv["total_wall_time"] is not None else "—"])
    return ["## Every run", "", "Validation metrics of each run's best checkpoint (`best.pt`, selected on the run's "
            "validation score), from its `eval.json`, with 95% intervals by bootstrap over validation videos "
            "where the evaluation kept them.", "", *md_table(header, rows, left=2)]


def _videos(ev: dict) -> str:
    """``VA 9 · EXPR 7 · AU 6`` from an evaluation's ``ci_method`` (— for older evaluations)."""
    per = (ev.get("ci_method") or {}).get("per_task") or {}
    return " · ".join(f"{t.upper()} {c['videos']}" for t, c in per.items()) or "—"


def _unlabelled(ev: dict) -> set[str]:
    return {x for groups in (ev.get("unlabelled") or {}).values() for v in groups.values() for x in v}


def _per_item_table(runs: Sequence[RunSummary], key: str, names: Sequence[str], title: str) -> list[str]:
    have = [r for r in runs if isinstance(r.eval.get(key), dict)]
    if not have:
        return []
    rows = []
    for name in names:
        vals = [r.eval[key].get(name) for r in have]
        # A class / AU without a validation label is n/a, not a 0 that looks like a score (eval.md says
        # whether the macro counts it).
        vals = [float(v) if isinstance(v, int | float) and math.isfinite(v) and name not in _unlabelled(r.eval) else None
                for v, r in zip(vals, have, strict=True)]
        best = max((v for v in vals if v is not None), default=None)
        # Bold marks a winner: not when every run ties (e.g. a class no run ever predicts).
        unique = sum(v == best for v in vals) < len(have)
        rows.append([name] + [f"**{fmt(v)}**" if v is not None and v == best and unique else fmt(v) for v in vals])
    return [f"## {title}", "", "Validation F1; the best run per row in bold.", "",
            *md_table(["", *(f"`{r.name}`" for r in have)], rows)]
def _convergence_table(runs: Sequence[RunSummary], frac: float) -> list[str]:
    pct = f"{frac:.0%}"
    header = ["run", "score", "best", "best epoch", f"target ({pct})", f"epochs to {pct}",
              f"wall time to {pct} (s)", "total wall time (s)"]
    rows = []
    for r in runs:
        c = convergence(r.curve, r.score_metric, frac)
        wall = lambda t: f"{t:.1f}" if t is not None else "—"  # noqa: E731
        rows.append([f"`{r.name}`", METRIC_LABEL[c["metric"]], fmt(c["best"]),
                     str(c["best_epoch"]) if c["best_epoch"] is not None else "—", fmt(c["target"]),
                     str(c["epochs"]) if c["epochs"] is not None else "—", wall(c["wall_time"]),
                     wall(c["total_wall_time"])])
    return ["## Convergence speed", "",
            f"Validation epochs and wall time until each run's own score first reached {pct} of its "
            "best (— when the best score is not positive or no curve was logged). The score is the "
            "task's metric (P_MTL for multi-task runs).", "", *md_table(header, rows)]



# ---- figures -----------------------------------------------------------------------------

def _styles(runs: Sequence[RunSummary]) -> dict[str, dict]:
    """One colour per run, the same in every figure; multi-task solid, uni-task dashed."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"]
    return {r.name: {"color": cmap(i % cmap.N), "linestyle": "-" if r.kind.mtl else "--"} for i, r in enumerate(runs)}


def write_figures(runs: Sequence[RunSummary], out: Path) -> dict[str, Path]:
    """``uni_vs_mtl.png``, ``curves_epoch.png``, ``curves_time.png`` (those there is data for).

    (Slightly over 60 lines: plotting statements for the figures, one after another.)
    """
    from matplotlib.figure import Figure

    figs: dict[str, Path] = {}
    style = _styles(runs)
    cells = group_cells(runs)
    uni = best_uni(cells)
    mtl = [c for c in cells if c.kind.mtl and c.kind.per_frame]
    if mtl and any(uni.values()):
        metrics = ("va_ccc", "expr_f1", "au_f1")
        series = [("uni-task (best)", [uni[t].mean(TASK_METRIC[t]) if uni[t] else None for t in ("va", "expr", "au")],
                   "0.55")]
        series += [(c.name, [c.mean(m) for m in metrics], style[c.runs[0].name]["color"]) for c in mtl]
        fig = Figure(figsize=(8, 4.6))
        ax = fig.subplots()
        width = 0.8 / len(series)
        for i, (name, vals, color) in enumerate(series):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(metrics))]
            ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=name, color=color)
        ax.set_xticks(range(len(metrics)), [METRIC_LABEL[m] for m in metrics])
        ax.set_ylabel("validation score (CCC / macro F1)")
        ax.set_title("Uni-task vs multi-task, per task")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=min(3, len(series)), loc="upper center", bbox_to_anchor=(0.5, -0.1))
        fig.tight_layout()
        figs["uni_vs_mtl"] = out / "uni_vs_mtl.png"
        fig.savefig(figs["uni_vs_mtl"], dpi=120, bbox_inches="tight")
    panels = [m for m in CURVE_METRICS if any(m in p for r in runs for p in r.curve)]
    if not panels:
        return figs
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    for key, xkey, xlabel in (("curves_epoch", "epoch", "epochs trained"), ("curves_time", "wall_time", "wall time (min)")):
        ncols = 2 if len(panels) > 1 else 1
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(figsize=(6 * ncols, 3.8 * nrows + 0.9))
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax, metric in zip(axes.flat, panels, strict=False):
            for r in runs:
                pts = [p for p in r.curve if metric in p and p.get(xkey) is not None]
                if pts:
                    xs = [p[xkey] / 60.0 if xkey == "wall_time" else p[xkey] + 1 for p in pts]
                    ax.plot(xs, [p[metric] for p in pts], marker="o", markersize=3, label=r.name, **style[r.name])
            ax.set_title(f"validation {METRIC_LABEL[metric]}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(METRIC_LABEL[metric] + (" (sum of 3 scores)" if metric == "p_mtl" else ""))
            ax.grid(alpha=0.3)
            if xkey == "epoch":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        # One legend entry per run, in report order, whichever panels the run appears in.
        drawn = {h.get_label() for ax in axes.flat for h in ax.get_lines()}
        handles = [Line2D([], [], marker="o", markersize=3, **style[r.name]) for r in runs if r.name in drawn]
        labels = [r.name for r in runs if r.name in drawn]
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(handles)), fontsize=8)
        fig.suptitle("Validation score vs " + ("epoch" if xkey == "epoch" else "wall time"))
        fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(handles) / 4), 1, 1))
        figs[key] = out / f"{key}.png"
        fig.savefig(figs[key], dpi=120)
    return figs


def write_report(cfg: ReportConfig) -> Path:
    """Write ``report.md``, ``report.json`` and the figures into ``cfg.out``; returns report.md."""
    paths = expand_runs(cfg.runs)
    runs: list[RunSummary] = []
    notes = list(cfg.notes)
    for p in paths:
        try:
            runs.append(load_run(p))
        except ValueError as exc:
            log.warning("%s", exc)
            notes.append(f"`{p}` left out: {exc}")
    order = {"va": 0, "expr": 1, "au": 2, "mtl": 3}
    runs.sort(key=lambda r: order.get(r.kind.task, 4))  # uni-task first, grid order within a kind
    if not runs:
        raise ValueError("no finished runs (folders with config.json and eval.json) among: " + ", ".join(map(str, paths)))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = group_cells(runs)
    rs = Resampler(runs, resamples=cfg.resamples, seed=cfg.seed)
    notes += rs.notes
    if rs.videos:
        notes.append(rs.method() + ".")
    figs = write_figures(runs, out)
    lines = [f"# {cfg.title}", "", f"{len(runs)} runs: " + ", ".join(f"`{r.name}`" for r in runs) + ".", ""]
    lines += _headline(cells, rs)
    if "uni_vs_mtl" in figs:
        lines += [f"![uni-task vs multi-task]({figs['uni_vs_mtl'].name})", ""]
    lines += _temporal(cells, rs)
    lines += _variants(cells, rs, "init", "Initialization", "Multi-task models from other initializations (ImageNet, "
                       "another run's backbone, a self-supervised pre-training run on every frame, ImageNet then "
                       "pre-training) against the same model from random weights trained on the labels of the same "
                       "share of the videos; Δ = run − reference.")
    lines += _variants(cells, rs, "loss", "Loss variants and task weighting", "Each variant against the cell that "
                       "differs from it only in that setting (CCC loss, class-weighted EXPR, pos-weighted AU, fixed "
                       "task weights); Δ = variant − reference.")
    lines += _seeds(cells)
    lines += _multiplicity(cells, rs)
    lines += _metrics_table(runs)
    lines += _per_item_table(runs, "expr_f1_per_class", EXPR_CLASSES, "EXPR F1 per class")
    lines += _per_item_table(runs, "au_f1_per_au", AU_NAMES, "AU F1 per action unit")
    lines += ["## Training curves", ""]
    if "curves_epoch" in figs:
        lines += ["Validation metrics after every epoch, one line per run (solid: multi-task, dashed: uni-task).", "",
                  f"![validation vs epoch]({figs['curves_epoch'].name})", "",
                  f"![validation vs wall time]({figs['curves_time'].name})", ""]
    else:
        lines += ["No validation curves in the runs' metrics.jsonl.", ""]
    lines += _convergence_table(runs, cfg.converge_frac)
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    md = out / "report.md"
    atomic_write_text(md, "\n".join(lines))
    summary = {
        "runs": {r.name: {"path": str(r.path), "kind": asdict(r.kind), "label": r.kind.label(), "eval": r.eval,
                          "convergence": convergence(r.curve, r.score_metric, cfg.converge_frac)} for r in runs},
        "uni_vs_mtl": uni_vs_mtl_rows(cells, rs), "temporal": temporal_rows(cells, rs),
        "init": variant_rows(cells, rs, "init"), "loss": variant_rows(cells, rs, "loss"),
        "figures": {k: v.name for k, v in figs.items()}, "notes": notes,
    }
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2, default=str))
    log.info("report: %s", md)
    return md


def report_folder(cfg: ReportConfig) -> Path:
    """``affpipe report -o OUT``: ``write_report`` into a folder that holds only report files."""
    with claim(cfg.out, OWNER, {}):
        return write_report(cfg)


def paired_lines(run_a: Path, run_b: Path, *, resamples: int = 2000, seed: int = 0) -> list[str]:
    """``affpipe report RUN_A RUN_B``: the paired difference of every metric both report, with its 95%
    interval over the same resampled recordings; an error when they cannot be paired. A multi-task
    run and a uni-task run are shown as multi-task − uni-task whatever the argument order, as
    report.md does, with the same interval (the same resamples)."""
    a, b = load_run(run_a), load_run(run_b)
    for r in (a, b):
        if r.predictions() is None:
            raise ValueError(f"{r.path}: its evaluation kept no predictions (eval_predictions.npz); "
                             f"run `affpipe evaluate {r.path}` first")
    if b.kind.mtl and not a.kind.mtl:
        a, b = b, a
    rs = Resampler([a, b], resamples=resamples, seed=seed, strict=True)
    side_a, side_b = rs.side([a]), rs.side([b])
    shared = [m for m in ("va_ccc", "valence_ccc", "arousal_ccc", "expr_f1", "au_f1", "p_mtl")
              if m in side_a and m in side_b]
    if not shared:
        raise ValueError(f"{a.path} ({a.kind.task}) and {b.path} ({b.kind.task}) share no metric")
    order = " (multi-task − uni-task, as in report.md)" if a.kind.mtl and not b.kind.mtl else ""
    lines = [f"{a.name} − {b.name}{order}, {rs.method()}:"]
    rows = [{"metric": m, **compare(side_a, side_b, m, a.eval.get(m), b.eval.get(m), seed=rs.seed)} for m in shared]
    counts = multiplicity(rows)
    for d in rows:
        verdict = "excludes 0" if d["excludes_zero"] else "includes 0"
        held = "" if not d["excludes_zero"] else ", holds after Holm" if d.get("holds") else ", not after Holm"
        lines.append(f"  {METRIC_LABEL[d['metric']]:12s} {fmt(d['a'])} vs {fmt(d['b'])}: {_diff(d)} ({verdict}{held})")
    lines.append("  " + multiplicity_line(counts) + " One seed per run: this model vs that model, not a recipe effect.")
    return lines
