"""``affpipe report``: the research questions answered from run folders, as markdown + PNGs.

Reads each run folder's ``config.json`` (what kind of run it is), ``eval.json`` (the final
metrics, reported verbatim) and ``metrics.jsonl`` (validation curves), and writes
``report.md`` whose first table answers "multi-task vs uni-task", then every run's metrics,
per-class / per-AU F1, overlaid training curves and convergence speed. ``report.json`` holds the
same numbers unrounded for scripts.

(A little over 400 lines: the report's tables and figures read the same ``Run`` records and
are only worth reading together.)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from affpipe.labels import AU_NAMES, EXPR_CLASSES
from affpipe.train.config import SCORE_KEY

log = logging.getLogger(__name__)

# The score each kind of run is selected and judged by.
TASK_METRIC = SCORE_KEY  # the validation score of each task (train.config owns it)
METRIC_LABEL = {
    "va_ccc": "VA CCC", "valence_ccc": "Valence CCC", "arousal_ccc": "Arousal CCC",
    "expr_f1": "EXPR F1", "au_f1": "AU F1", "p_mtl": "P_MTL",
}
TASK_NAME = {"va": "VA", "expr": "EXPR", "au": "AU", "mtl": "MTL"}
CURVE_METRICS = ("va_ccc", "expr_f1", "au_f1", "p_mtl")


@dataclass(frozen=True)
class ReportConfig:
    """What ``affpipe report`` reads and where it writes."""

    runs: tuple[Path, ...]
    out: Path
    title: str = "affpipe experiments"
    converge_frac: float = 0.9  # convergence = first epoch reaching this share of the best score
    notes: tuple[str, ...] = ()  # extra lines for the report (e.g. runs skipped by experiments)


@dataclass(frozen=True)
class RunKind:
    """What a run is, derived from its resolved ``config.json``."""

    task: str  # va | expr | au | mtl
    init: str  # random | imagenet | the source run's name (checkpoint init) | a path
    va_loss: str | None = None
    expr_weighted: bool | None = None
    au_weighted: bool | None = None
    task_weighting: str | None = None
    temporal: str | None = None  # the temporal head's arch (tcn | transformer); None: per-frame

    @property
    def mtl(self) -> bool:
        return self.task == "mtl"

    def label(self) -> str:
        """Short human label, e.g. ``MTL · init uni_va · CCC · weighted · fixed``."""
        parts = ["MTL" if self.mtl else f"uni {TASK_NAME.get(self.task, self.task)}", f"init {self.init}"]
        if self.temporal:  # init names the run whose frame features the head reads
            parts = [parts[0], f"{self.temporal} head on {self.init}'s features"]
        if self.va_loss:
            parts.append(self.va_loss.upper())
        if self.expr_weighted is not None:
            parts.append("EXPR " + ("weighted" if self.expr_weighted else "unweighted"))
        if self.au_weighted is not None:
            parts.append("AU " + ("weighted" if self.au_weighted else "unweighted"))
        if self.mtl and self.task_weighting:
            parts.append(f"{self.task_weighting} task weights")
        return " · ".join(parts)

    def short(self) -> str:
        """Only what sets the run apart from the defaults, e.g. ``init uni_va · uncertainty``."""
        parts = [f"{self.temporal} head on {self.init}" if self.temporal else f"init {self.init}"]
        if self.va_loss == "mse":
            parts.append("VA MSE")
        if self.expr_weighted is False:
            parts.append("EXPR unweighted")
        if self.au_weighted is False:
            parts.append("AU unweighted")
        if self.task_weighting not in (None, "fixed"):
            parts.append(f"{self.task_weighting} task weights")
        return " · ".join(parts)


@dataclass
class Run:
    """One run folder's contents as the report needs them."""

    name: str
    path: Path
    kind: RunKind
    config: dict
    eval: dict
    curve: list[dict] = field(default_factory=list)  # per epoch: epoch, wall_time, metric → value
    smoothed: dict | None = None  # eval_smoothed.json: the same checkpoint with tuned smoothing

    @property
    def score_metric(self) -> str:
        return TASK_METRIC.get(self.kind.task, "p_mtl")


def _tasks_of(config: dict) -> tuple[str, ...]:
    task = config.get("task")
    if task in ("va", "expr", "au"):
        return (task,)
    tasks = (config.get("model") or {}).get("tasks")
    return tuple(tasks) if tasks else ("va", "expr", "au")


def run_kind(config: dict) -> RunKind:
    """Classify a run from its resolved config (task, model.init, loss settings)."""
    tasks = _tasks_of(config)
    task = config.get("task") or (tasks[0] if len(tasks) == 1 else "mtl")
    model, loss = config.get("model") or {}, config.get("loss") or {}
    init = str(model.get("init", "random"))
    if init not in ("random", "imagenet"):
        # A checkpoint: name it by its run folder (runs/<name>/best.pt), which is what people know.
        p = Path(init)
        init = p.parent.name if p.suffix in (".pt", ".pth") and p.parent.name else p.name
    if config.get("features"):
        from affpipe.experiments.temporal import source_run_name

        init = source_run_name(Path(config["features"]))
    return RunKind(
        task=task,
        init=init,
        temporal=(config.get("temporal") or {}).get("arch", "tcn") if config.get("features") else None,
        va_loss=loss.get("va_loss", "ccc") if "va" in tasks else None,
        expr_weighted=bool(loss.get("expr_class_weights", True)) if "expr" in tasks else None,
        au_weighted=bool(loss.get("au_pos_weight", True)) if "au" in tasks else None,
        task_weighting=loss.get("task_weighting", "fixed") if len(tasks) > 1 else None,
    )


def _num(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def read_curve(metrics_jsonl: Path) -> list[dict]:
    """Per-epoch validation points from ``metrics.jsonl``, tolerant of what else the file holds.

    A validation point is a trainer ``"kind": "epoch"`` line with its nested ``"val": {...}``
    metrics (epochs numbered from 0). Step lines and epochs without validation are ignored; a
    repeated epoch (a resumed run) keeps the last line. ``wall_time`` is seconds since the run
    started.
    Returns ``[{"epoch", "wall_time", <metric>: value, ...}]`` sorted by epoch.
    """
    if not metrics_jsonl.exists():
        return []
    points: dict[int, dict] = {}
    for lineno, line in enumerate(metrics_jsonl.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:  # a run killed mid-write leaves a torn last line
            log.warning("%s:%d: not JSON (%s); ignored", metrics_jsonl, lineno, exc)
            continue
        if not isinstance(rec, dict) or rec.get("kind") != "epoch" or _num(rec.get("epoch")) is None:
            continue
        nested = rec.get("val")
        vals = {k: v for k, v in nested.items() if _num(v) is not None} if isinstance(nested, dict) else {}
        if not vals:
            continue
        point = {"epoch": int(rec["epoch"]), "wall_time": _num(rec.get("wall_time")), **{k: float(v) for k, v in vals.items()}}
        points[point["epoch"]] = point
    return [points[e] for e in sorted(points)]


def load_run(path: Path) -> Run:
    """Read one run folder (needs ``config.json`` and ``eval.json``)."""
    path = Path(path)
    for need in ("config.json", "eval.json"):
        if not (path / need).exists():
            raise ValueError(f"{path / need}: missing — not a finished run folder")
    config = json.loads((path / "config.json").read_text())
    smoothed = path / "eval_smoothed.json"
    return Run(
        name=path.name, path=path, kind=run_kind(config), config=config,
        eval=json.loads((path / "eval.json").read_text()), curve=read_curve(path / "metrics.jsonl"),
        smoothed=json.loads(smoothed.read_text()) if smoothed.is_file() else None,
    )


def expand_runs(paths: Sequence[Path]) -> list[Path]:
    """Run folders from the arguments: a folder without ``config.json`` stands for its sub-runs."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.json").exists() or not p.is_dir():
            found.append(p)
        else:
            found.extend(sorted(c.parent for c in p.glob("*/config.json")))
    return found


def convergence(curve: list[dict], metric: str, frac: float = 0.9) -> dict:
    """Epochs and wall time until the validation ``metric`` first reaches ``frac`` of its best.

    ``epochs`` and ``best_epoch`` count epochs trained (the 0-based logged epoch + 1). When
    the best score is not positive, "90% of it" means nothing and the result holds ``None``.
    """
    pts = [p for p in curve if _num(p.get(metric)) is not None]
    out = {"metric": metric, "best": None, "best_epoch": None, "target": None, "epochs": None,
           "wall_time": None, "total_epochs": len(pts), "total_wall_time": None}
    if not pts:
        return out
    best = max(pts, key=lambda p: p[metric])
    out.update(best=best[metric], best_epoch=best["epoch"] + 1, total_epochs=pts[-1]["epoch"] + 1,
               total_wall_time=pts[-1].get("wall_time"))
    if best[metric] <= 0:
        return out
    out["target"] = frac * best[metric]
    for p in pts:
        if p[metric] >= out["target"]:
            out.update(epochs=p["epoch"] + 1, wall_time=p.get("wall_time"))
            break
    return out


def uni_vs_mtl(runs: Sequence[Run]) -> dict:
    """The headline comparison: per task, the best uni-task run vs every multi-task run.

    Returns ``{"uni": {task: run or None}, "rows": [{"run", "kind", metric: (value, diff)}]}``
    where ``diff`` = MTL − uni (None when either side is missing). The uni-task P_MTL is the sum
    of the three uni-task models' scores: what three separate networks achieve together.
    """
    uni: dict[str, Run | None] = {}
    for task in ("va", "expr", "au"):
        metric = TASK_METRIC[task]
        cands = [r for r in runs if r.kind.task == task and _num(r.eval.get(metric)) is not None]
        uni[task] = max(cands, key=lambda r: r.eval[metric]) if cands else None
    uni_vals = {TASK_METRIC[t]: (uni[t].eval[TASK_METRIC[t]] if uni[t] else None) for t in uni}
    parts = list(uni_vals.values())
    uni_vals["p_mtl"] = sum(parts) if all(v is not None for v in parts) else None
    rows = []
    for r in runs:
        if not r.kind.mtl or r.kind.temporal:  # temporal heads have their own table
            continue
        row: dict = {"run": r.name, "kind": r.kind.short()}
        for metric, u in uni_vals.items():
            v = _num(r.eval.get(metric))
            row[metric] = (v, v - u if v is not None and u is not None else None)
        rows.append(row)
    return {"uni": uni, "uni_values": uni_vals, "rows": rows}


# ---- markdown ----------------------------------------------------------------------------

def fmt(v: float | None, signed: bool = False) -> str:
    """Four decimals (``+`` sign for differences); ``—`` for a missing value."""
    if v is None:
        return "—"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    align = ["---"] * left + ["---:"] * (len(header) - left)
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _headline(runs: Sequence[Run]) -> list[str]:
    cmp = uni_vs_mtl(runs)
    metrics = ("va_ccc", "expr_f1", "au_f1", "p_mtl")
    lines = ["## Multi-task vs uni-task", ""]
    uni_names = [f"{TASK_NAME[t]}: `{r.name}`" for t, r in cmp["uni"].items() if r]
    if not uni_names:
        lines += ["No uni-task runs among the inputs: nothing to compare against.", ""]
    if not cmp["rows"]:
        lines += ["No multi-task runs among the inputs.", ""]
    header = ["model"] + [x for m in metrics for x in (METRIC_LABEL[m], "Δ")]
    rows = [["uni-task (best per task)"] + [x for m in metrics for x in (fmt(cmp["uni_values"][m]), "")]]
    for row in cmp["rows"]:
        rows.append([f"`{row['run']}` ({row['kind']})"]
                    + [x for m in metrics for x in (fmt(row[m][0]), fmt(row[m][1], signed=True))])
    lines += [
        "Each task's validation metric for the best uni-task model of that task and for every "
        "multi-task model; Δ = MTL − uni (positive: multi-task is better). The uni-task P_MTL "
        "is the sum of the three uni-task models' scores (three networks vs one).",
        "", *_table(header, rows),
    ]
    if uni_names:
        lines += ["Uni-task reference runs — " + ", ".join(uni_names) + ".", ""]
    return lines


def _metrics_table(runs: Sequence[Run]) -> list[str]:
    metrics = ("va_ccc", "valence_ccc", "arousal_ccc", "expr_f1", "au_f1", "p_mtl")
    header = ["run", "kind", *(METRIC_LABEL[m] for m in metrics), "epochs", "wall time (s)"]
    rows = []
    for r in runs:
        conv = convergence(r.curve, r.score_metric)
        rows.append([f"`{r.name}`", r.kind.label(), *(fmt(_num(r.eval.get(m))) for m in metrics),
                     str(conv["total_epochs"] or r.config.get("epochs", "—")),
                     fmt(conv["total_wall_time"]).rsplit(".", 1)[0] if conv["total_wall_time"] is not None else "—"])
    return ["## Every run", "", "Validation metrics of each run's best checkpoint (`best.pt`, selected on the run's validation score), from its `eval.json`.", "", *_table(header, rows, left=2)]


def _per_item_table(runs: Sequence[Run], key: str, names: Sequence[str], title: str) -> list[str]:
    have = [r for r in runs if isinstance(r.eval.get(key), dict)]
    if not have:
        return []
    rows = []
    for name in names:
        vals = [_num(r.eval[key].get(name)) for r in have]
        best = max((v for v in vals if v is not None), default=None)
        # Bold marks a winner: not when every run ties (e.g. a class no run ever predicts).
        unique = sum(v == best for v in vals) < len(have)
        rows.append([name] + [f"**{fmt(v)}**" if v is not None and v == best and unique else fmt(v) for v in vals])
    return [f"## {title}", "", "Validation F1; the best run per row in bold.", "",
            *_table(["", *(f"`{r.name}`" for r in have)], rows)]


def _convergence_table(runs: Sequence[Run], frac: float) -> list[str]:
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
            "task's metric (P_MTL for multi-task runs).", "", *_table(header, rows)]


# ---- figures -----------------------------------------------------------------------------

def _styles(runs: Sequence[Run]) -> dict[str, dict]:
    """One colour per run, the same in every figure; multi-task solid, uni-task dashed."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"]
    return {r.name: {"color": cmap(i % cmap.N), "linestyle": "-" if r.kind.mtl else "--"} for i, r in enumerate(runs)}


def write_figures(runs: Sequence[Run], out: Path) -> dict[str, Path]:
    """``uni_vs_mtl.png``, ``curves_epoch.png``, ``curves_time.png`` (those there is data for).

    (Slightly over 60 lines: plotting statements for the figures, one after another.)
    """
    from matplotlib.figure import Figure

    figs: dict[str, Path] = {}
    style = _styles(runs)
    cmp = uni_vs_mtl(runs)
    if cmp["rows"] and any(cmp["uni"].values()):
        metrics = ("va_ccc", "expr_f1", "au_f1")
        series = [("uni-task (best)", [cmp["uni_values"][m] for m in metrics], "0.55")]
        series += [(row["run"], [row[m][0] for m in metrics], style[row["run"]]["color"]) for row in cmp["rows"]]
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
    runs: list[Run] = []
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
    figs = write_figures(runs, out)
    lines = [f"# {cfg.title}", "", f"{len(runs)} runs: " + ", ".join(f"`{r.name}`" for r in runs) + ".", ""]
    from affpipe.experiments.temporal import temporal_rows, temporal_section

    lines += _headline(runs)
    lines += temporal_section(runs)
    if "uni_vs_mtl" in figs:
        lines += [f"![uni-task vs multi-task]({figs['uni_vs_mtl'].name})", ""]
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
    md.write_text("\n".join(lines))
    summary = {
        "runs": {r.name: {"path": str(r.path), "kind": asdict(r.kind), "label": r.kind.label(), "eval": r.eval,
                          "convergence": convergence(r.curve, r.score_metric, cfg.converge_frac)} for r in runs},
        "uni_vs_mtl": {k: v for k, v in uni_vs_mtl(runs).items() if k != "uni"},
        "temporal": temporal_rows(runs),
        "figures": {k: v.name for k, v in figs.items()}, "notes": notes,
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info("report: %s", md)
    return md
