"""Run folders as the report reads them: what kind of run each is, its metrics, curve and predictions.

``load_run`` reads a run folder's ``config.json`` (what kind of run it is), ``eval.json`` (the
final metrics, with their intervals), ``eval_smoothed.json`` when the grid smoothed it, and
``metrics.jsonl`` (validation curves, via ``train.checkpoint.read_metrics``). Runs of one grid
cell trained with several seeds (``<name>-seed<k>``) share a ``cell``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from affpipe.run.checkpoint import read_metrics
from affpipe.run.config import SCORE_KEY
from affpipe.run.folder import RunFolder, eval_stem

log = logging.getLogger(__name__)

# The score each kind of run is selected and judged by.
TASK_METRIC = SCORE_KEY  # the validation score of each task (run.config owns it)
METRIC_LABEL = {
    "va_ccc": "VA CCC", "valence_ccc": "Valence CCC", "arousal_ccc": "Arousal CCC",
    "expr_f1": "EXPR F1", "au_f1": "AU F1", "p_mtl": "P_MTL",
}
TASK_NAME = {"va": "VA", "expr": "EXPR", "au": "AU", "mtl": "MTL"}
_SEED = re.compile(r"-seed(\d+)$")


def cell_name(run_name: str) -> str:
    """The grid cell of a run folder name (``mtl_random-seed2`` → ``mtl_random``)."""
    return _SEED.sub("", run_name)


@dataclass(frozen=True)
class RunLabel:
    """What a run is, derived from its resolved ``config.json``."""

    task: str  # va | expr | au | mtl
    init: str  # random | imagenet | the source run's name (checkpoint init) | a path
    va_loss: str | None = None
    expr_weighted: bool | None = None
    au_weighted: bool | None = None
    task_weighting: str | None = None
    temporal: str | None = None  # the temporal head's arch (tcn | transformer); None: per-frame
    pretrain: str | None = None  # a pre-training run's method (its scores are a k-NN probe's)
    label_fraction: float = 1.0  # the share of the train videos whose labels the run trained on

    @property
    def mtl(self) -> bool:
        return self.task == "mtl"

    @property
    def per_frame(self) -> bool:
        """A per-frame model with heads (neither a temporal head nor a pre-training probe)."""
        return not self.temporal and not self.pretrain

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
        if self.pretrain:
            parts = [f"{self.pretrain} pre-training (k-NN probe)", f"init {self.init}"]
        if self.label_fraction < 1.0:
            parts.append(f"labels of {self.label_fraction:.0%} of the videos")
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
        if self.pretrain:
            parts.insert(0, f"{self.pretrain} probe")
        if self.label_fraction < 1.0:
            parts.append(f"{self.label_fraction:.0%} labels")
        return " · ".join(parts)


@dataclass
class RunSummary:
    """One run folder's contents as the report needs them."""

    name: str
    path: Path
    kind: RunLabel
    config: dict
    eval: dict
    curve: list[dict] = field(default_factory=list)  # per epoch: epoch, wall_time, metric → value
    smoothed: dict | None = None  # eval_smoothed.json: the same checkpoint with tuned smoothing

    @property
    def score_metric(self) -> str:
        return TASK_METRIC.get(self.kind.task, "p_mtl")

    @property
    def cell(self) -> str:
        return cell_name(self.name)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def predictions(self, variant: str = "eval") -> Path | None:
        """The predictions file kept by an evaluation: ``eval`` (eval.json), ``smoothed``
        (smoothing tuned on the split) or ``smoothed_cv`` (cross-validated smoothing); None if absent."""
        record = {"eval": self.eval, "smoothed": self.smoothed,
                  "smoothed_cv": (self.smoothed or {}).get("cross_validated")}[variant]
        name = (record or {}).get("predictions")
        return self.path / name if isinstance(name, str) and (self.path / name).is_file() else None


def _tasks_of(config: dict) -> tuple[str, ...]:
    task = config.get("task")
    if task in ("va", "expr", "au"):
        return (task,)
    tasks = (config.get("model") or {}).get("tasks")
    return tuple(tasks) if tasks else ("va", "expr", "au")


def run_label(config: dict) -> RunLabel:
    """Classify a run from its resolved config (task, model.init, loss settings)."""
    tasks = _tasks_of(config)
    task = config.get("task") or (tasks[0] if len(tasks) == 1 else "mtl")
    model, loss = config.get("model") or {}, config.get("loss") or {}
    init = str(model.get("init", "random"))
    if init not in ("random", "imagenet"):
        # A checkpoint: name it by its run folder (runs/<name>/best.pt), which is what people know.
        p = Path(init)
        init = cell_name(p.parent.name if p.suffix in (".pt", ".pth") and p.parent.name else p.name)
    own = _kind_of_config(config).describe(config)  # what the run's kind sets apart
    if own.get("sources"):  # a head over other runs' features: named by them (seeds of a cell: one label)
        init = " + ".join(cell_name(source_run_name(Path(f))) for f in own["sources"])
    return RunLabel(
        task=task,
        init=init,
        temporal=own.get("temporal"),
        pretrain=own.get("method"),
        label_fraction=float(config.get("label_fraction") or 1.0),
        va_loss=loss.get("va_loss", "ccc") if "va" in tasks else None,
        expr_weighted=bool(loss.get("expr_class_weights", True)) if "expr" in tasks else None,
        au_weighted=bool(loss.get("au_pos_weight", True)) if "au" in tasks else None,
        task_weighting=loss.get("task_weighting", "fixed") if len(tasks) > 1 else None,
    )


def source_run_name(features: Path) -> str:
    """The run whose checkpoint a feature table was embedded from (else the table's folder name)."""
    try:
        source = json.loads((Path(features) / "manifest.json").read_text()).get("source_checkpoint")
    except (OSError, ValueError):
        source = None
    return Path(source).parent.name if source and source.endswith(".pt") else Path(features).name


def _num(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def read_curve(metrics_jsonl: Path) -> list[dict]:
    """Per-epoch validation points from ``metrics.jsonl`` (read by ``train.checkpoint.read_metrics``).

    A validation point is a trainer ``"kind": "epoch"`` line with its nested ``"val": {...}``
    metrics (epochs numbered from 0). Step lines and epochs without validation are ignored; a
    repeated epoch (a resumed run) keeps the last line. ``wall_time`` is seconds since the run
    started. Returns ``[{"epoch", "wall_time", <metric>: value, ...}]`` sorted by epoch.
    """
    if not metrics_jsonl.exists():
        return []
    points: dict[int, dict] = {}
    for rec in read_metrics(metrics_jsonl):
        if not isinstance(rec, dict) or rec.get("kind") != "epoch" or _num(rec.get("epoch")) is None:
            continue
        nested = rec.get("val")
        vals = {k: v for k, v in nested.items() if _num(v) is not None} if isinstance(nested, dict) else {}
        if not vals:
            continue
        point = {"epoch": int(rec["epoch"]), "wall_time": _num(rec.get("wall_time")), **{k: float(v) for k, v in vals.items()}}
        points[point["epoch"]] = point
    return [points[e] for e in sorted(points)]


def _kind_of_config(config: dict):
    """The kind of run a config.json describes (through the registry)."""
    from affpipe.run.config import from_dict
    from affpipe.runs.kinds import kind_of

    try:
        return kind_of(from_dict(config, source="a run's config"))
    except ValueError:
        from affpipe.train.frames import FRAMES

        return FRAMES  # a config this affpipe cannot build: labelled as a per-frame run


def load_run(path: Path) -> RunSummary:
    """Read one run folder (needs ``config.json`` and ``eval.json``) through its typed readers."""
    files = RunFolder(path)
    for need in (files.config, files.eval_json()):
        if not need.exists():
            raise ValueError(f"{need}: missing — not a finished run folder")
    config = files.read_config()
    smoothed = eval_stem(smoothed=True)
    return RunSummary(
        name=files.path.name, path=files.path, kind=run_label(config), config=config,
        eval=files.read_eval(), curve=read_curve(files.metrics),
        smoothed=files.read_eval(smoothed) if files.has_eval(smoothed) else None,
    )


def expand_runs(paths: Sequence[Path]) -> list[Path]:
    """Run folders from the arguments: a folder without ``config.json`` stands for its sub-runs."""
    found: list[Path] = []
    for p in map(Path, paths):
        if RunFolder(p).has_config() or not p.is_dir():
            found.append(p)
        else:
            found.extend(sorted(c for c in p.iterdir() if c.is_dir() and RunFolder(c).has_config()))
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


def fmt(v: float | None, signed: bool = False) -> str:
    """Four decimals (``+`` sign for differences); ``—`` for a missing value."""
    if v is None:
        return "—"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    align = ["---"] * left + ["---:"] * (len(header) - left)
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(r) + " |" for r in rows), ""]


