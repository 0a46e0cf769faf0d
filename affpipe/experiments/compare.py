"""Paired comparisons for the report: every research question answered with a difference and its
95% interval over the same resampled validation recordings, with seeds as a level of their own.

Each run's evaluation keeps its per-frame predictions (``eval_predictions.npz``; the grid's
smoothed evaluations ``eval_smoothed[_cv]_predictions.npz``). ``Resampler`` reduces each file to
per-recording statistics (``scoring.bootstrap``), checks that every run was scored on the same rows
with the same labels, and draws one set of recording resamples for the whole report. A side of a
comparison is a list of seeds: a resample draws the seeds with replacement (outer level) and the
recordings (inner level, the same for both sides: paired), so seed-to-seed variation is inside the
interval instead of being read as a recipe effect (``intervals.two_level``). With one seed per
cell the interval cannot see seed variation at all: the report then speaks of *this model vs that
model*, never of a recipe. Each table's claims are adjusted together (Holm). Runs without
predictions (older run folders) are compared on point values only, and the report says so.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from affpipe.experiments.runs import METRIC_LABEL, TASK_METRIC, RunLabel, RunSummary
from affpipe.scoring import bootstrap as bs
from affpipe.scoring import intervals as iv

log = logging.getLogger(__name__)

MAIN_METRICS = ("va_ccc", "expr_f1", "au_f1", "p_mtl")
VARIANT_LABEL = {"eval": "", "smoothed": " + smoothing (tuned on val)", "smoothed_cv": " + smoothing (cross-validated)"}


@dataclass
class Cell:
    """One grid cell: the runs of one recipe and overrides, one per seed."""

    name: str
    kind: RunLabel
    runs: list[RunSummary]

    def values(self, metric: str, variant: str = "eval") -> list[float]:
        """The metric of each seed's evaluation (``variant``), where present."""
        out = []
        for r in self.runs:
            ev = {"eval": r.eval, "smoothed": r.smoothed, "smoothed_cv": (r.smoothed or {}).get("cross_validated")}[variant]
            v = (ev or {}).get(metric)
            if isinstance(v, int | float) and np.isfinite(v):
                out.append(float(v))
        return out

    def mean(self, metric: str, variant: str = "eval") -> float | None:
        vals = self.values(metric, variant)
        return float(np.mean(vals)) if len(vals) == len(self.runs) and vals else None


def group_cells(runs: Sequence[RunSummary]) -> list[Cell]:
    """Runs grouped by grid cell (``<name>-seed<k>`` with ``<name>``), in first-seen order."""
    cells: dict[tuple[str, RunLabel], Cell] = {}
    for r in runs:
        key = (r.cell, r.kind)
        cells.setdefault(key, Cell(r.cell, r.kind, []))
        cells[key].runs.append(r)
    names = [c.name for c in cells.values()]
    for c in cells.values():  # the same name with two kinds: keep them apart by run name
        if names.count(c.name) > 1:
            c.name = c.runs[0].name
        c.runs.sort(key=lambda r: r.seed)
    return list(cells.values())


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class Resampler:
    """Per-resample metrics of runs' evaluations over one set of resampled validation videos."""

    def __init__(self, runs: Sequence[RunSummary], *, resamples: int = bs.DEFAULT_RESAMPLES, seed: int = 0,
                 strict: bool = False) -> None:
        self.stats: dict[tuple[str, str], bs.VideoStats] = {}
        self.notes: list[str] = []
        loaded = []  # (run, file, digests of rows and labels, statistics)
        for r in runs:
            for variant in VARIANT_LABEL:
                path = r.predictions(variant)
                if path is not None:
                    arrays, videos = bs.load_predictions(path)
                    digests = {"rows": _digest(arrays["row_id"], videos.astype(str)),
                               **{k: _digest(v) for k, v in arrays.items() if k.endswith(("_target", "_mask"))}}
                    loaded.append((r, variant, path, digests, bs.video_stats(arrays, videos)))
        # The split most runs were scored on is the reference, whatever the argument order; only a
        # run that is kept sets the fingerprints the others are checked against.
        share = Counter(d["rows"] for *_, d, _ in loaded)
        refs: dict[str, tuple[str, str]] = {}  # "rows" and each label array → (first kept file, digest)
        left_out: set[str] = set()
        for r, variant, path, digests, st in sorted(loaded, key=lambda x: -share[x[3]["rows"]]):
            if r.name in left_out:
                continue
            bad = [k for k, d in digests.items() if k in refs and refs[k][1] != d]
            if bad:
                what = "row ids or videos" if "rows" in bad else "labels"
                other = refs[bad[0]][0]
                if strict:
                    raise ValueError(f"{r.path / path.name} and {other} were not evaluated on the same split ({what} "
                                     "differ); paired comparisons need runs evaluated on the same validation split")
                self.notes.append(f"`{r.name}` left out of the paired comparisons: {what} differ from `{other}`")
                left_out.add(r.name)
                continue
            for k, d in digests.items():
                refs.setdefault(k, (f"{r.name}/{path.name}", d))
            self.stats[(r.name, variant)] = st
        first = next(iter(self.stats.values()), None)
        self.videos = 0 if first is None else len(first.videos)
        self.per_task: dict[str, dict[str, int]] = {}  # the same split and labels: the same counts
        for st in self.stats.values():
            self.per_task.update(st.labelled or {})
        # One video resamples to itself: no interval rather than a falsely certain one.
        self.weights = bs.point_and_resamples(self.videos, resamples, seed) if self.videos >= 2 else None
        self.resamples, self.seed = resamples, seed
        self._cache: dict[tuple, dict[str, np.ndarray] | None] = {}

    def side(self, runs: Sequence[RunSummary], variant: str = "eval") -> dict[str, list[list[np.ndarray]]] | None:
        """Per metric, one component holding each seed's ``[1 + B]`` metric (row 0: the full split);
        None when a run has no predictions for ``variant``."""
        key = (tuple(r.name for r in runs), variant)
        if key not in self._cache:
            stats = [self.stats.get((r.name, variant)) for r in runs]
            ok = runs and self.weights is not None and all(s is not None for s in stats)
            if ok:
                per = [bs.metrics_from_stats(s, self.weights) for s in stats]
                keys = set.intersection(*(set(p) for p in per)) & set(bs.SCALAR_METRICS)
                self._cache[key] = {k: [[p[k] for p in per]] for k in keys}
            else:
                self._cache[key] = None
        return self._cache[key]

    def counts(self) -> str:
        """``VA 9, EXPR 7, AU 6 videos with labels`` (and the small-sample warning), or ''."""
        if not self.per_task:
            return ""
        text = "; videos with labels: " + ", ".join(f"{t.upper()} {c['videos']}" for t, c in self.per_task.items())
        few = {t: c["units"] for t, c in self.per_task.items() if c["units"] < iv.MIN_RECORDINGS}
        return text + (f". **Warning:** {bs.small_sample_warning(few)}" if few else "")

    def underpowered(self) -> str:
        """One sentence when a task rests on fewer validation recordings than the intervals were
        shown to cover at (``intervals.MIN_RECORDINGS``), else ''."""
        few = {t: c["units"] for t, c in (self.per_task or {}).items() if c["units"] < iv.MIN_RECORDINGS}
        if not few:
            return ""
        what = ", ".join(f"{t.upper()} {n}" for t, n in few.items())
        return (f"**Under-powered:** this question rests on {what} validation recordings, fewer than the "
                f"{iv.MIN_RECORDINGS} at which the 95% intervals were shown to cover; its intervals are too narrow "
                "and a difference here is weak evidence (more, shorter videos fix it: see the grid's [synthetic]).")

    def method(self) -> str:
        return (f"95% intervals: paired bootstrap over the same {self.videos} validation recordings (a recording's "
                f"_left/_right subjects are one unit; {self.resamples} resamples, seed {self.seed}), percentile "
                "interval of the difference; a cell trained with several seeds has its seeds resampled too (two "
                "levels: seeds, then recordings), so seed-to-seed variation is part of every interval" + self.counts())


def _values(components: list[list[np.ndarray]], rng: np.random.Generator) -> np.ndarray:
    """``[1 + B]``: the sum over components of the mean over seeds drawn with replacement."""
    total = 0
    for per_seed in components:
        m = np.stack(per_seed)
        idx = iv.seed_draws(len(m), m.shape[1] - 1, rng)
        total = total + m[idx, np.arange(m.shape[1])[:, None]].mean(1)
    return total


def compare(a: dict | None, b: dict | None, metric: str, point_a: float | None, point_b: float | None, *,
            seed: int = 0) -> dict[str, Any]:
    """The difference ``a − b`` of one metric: with its two-level interval and bootstrap p-value when
    both sides resample; ``seeds`` is the smallest number of seeds behind a side."""
    if a is not None and b is not None and metric in a and metric in b:
        rng = np.random.default_rng([seed, 0x5EED])
        va, vb = _values(a[metric], rng), _values(b[metric], rng)
        out = bs.difference(va, vb)
        return {**out, "p": iv.p_value(va[1:] - vb[1:]),
                "seeds": min(len(c) for c in (*a[metric], *b[metric]))}
    diff = point_a - point_b if point_a is not None and point_b is not None else None
    why = "no kept predictions" if a is None or b is None else f"no {metric} on one side"
    return {"a": point_a, "b": point_b, "diff": diff, "ci": None, "excludes_zero": False, "why": why}


def uni_side(rs: Resampler, uni: dict[str, Cell | None]) -> tuple[dict | None, dict[str, float | None]]:
    """Three uni-task models as one: each task's metric from its own model, P_MTL their sum (only
    when all three are there); a task without a uni-task model (or its predictions) is left out."""
    points = {TASK_METRIC[t]: (c.mean(TASK_METRIC[t]) if c else None) for t, c in uni.items()}
    parts = list(points.values())
    points["p_mtl"] = sum(parts) if all(v is not None for v in parts) else None
    sides = {t: rs.side(c.runs) if c else None for t, c in uni.items()}
    out = {TASK_METRIC[t]: s[TASK_METRIC[t]] for t, s in sides.items() if s is not None and TASK_METRIC[t] in s}
    if not out:
        return None, points
    if len(out) == 3:
        out["p_mtl"] = [c for m in ("va_ccc", "expr_f1", "au_f1") for c in out[m]]
    return out, points


def best_uni(cells: Sequence[Cell]) -> dict[str, Cell | None]:
    """Per task, the uni-task cell with the best mean score (the strongest baseline)."""
    out: dict[str, Cell | None] = {}
    for task in ("va", "expr", "au"):
        cands = [c for c in cells if c.kind.task == task and c.kind.per_frame and c.mean(TASK_METRIC[task]) is not None]
        out[task] = max(cands, key=lambda c: c.mean(TASK_METRIC[task])) if cands else None
    return out


# Reference value of each setting a grid cell can change; a cell that differs from another in
# exactly one of them, where the other holds the reference, is compared with it.
REFERENCE = {"init": "random", "va_loss": "ccc", "expr_weighted": True, "au_weighted": True, "task_weighting": "fixed"}
QUESTION = {"init": "init", "va_loss": "loss", "expr_weighted": "loss", "au_weighted": "loss", "task_weighting": "loss"}


def variant_pairs(cells: Sequence[Cell]) -> list[tuple[str, Cell, Cell]]:
    """``(question, cell, reference cell)`` for per-frame cells one setting away from a reference."""
    out = []
    frame = [c for c in cells if c.kind.per_frame]
    for c in frame:
        for ref in frame:
            diffs = [f for f in REFERENCE if getattr(c.kind, f) != getattr(ref.kind, f)]
            same = c.kind.task == ref.kind.task and c.kind.label_fraction == ref.kind.label_fraction
            if same and len(diffs) == 1 and getattr(ref.kind, diffs[0]) == REFERENCE[diffs[0]]:
                out.append((QUESTION[diffs[0]], c, ref))
    return out


def metrics_of(kind: RunLabel) -> tuple[str, ...]:
    return MAIN_METRICS if kind.mtl else (TASK_METRIC[kind.task],)


def seeds_of(cells: Sequence[Cell]) -> int:
    return max((len(c.runs) for c in cells), default=1)


def no_interval_reason(rows: Sequence[dict[str, Any]], videos: int) -> str:
    """Why a table has no interval at all, from what its rows say (never a guess)."""
    if videos < 2:
        return f"the runs were scored on {videos} recording{'s' if videos != 1 else ''}: nothing to resample"
    whys = sorted({r.get("why", "") for r in rows if r.get("why")})
    if whys == ["no kept predictions"]:
        return "the runs kept no predictions: rerun `affpipe evaluate` on them"
    return "; ".join(whys) or "no metric both sides resample"


def sentence(topic: str, rows: Sequence[dict[str, Any]], seeds: int, videos: int) -> str:
    """The sentence the numbers support: the differences whose interval excludes 0 after Holm's
    adjustment over the table's intervals, as a *recipe* finding only when every cell behind it
    had at least 2 seeds (else: this model vs that model); then the multiplicity line."""
    if not rows:
        return f"**{topic}:** nothing to compare among these runs."
    if not any(r["ci"] for r in rows):
        return (f"**{topic}:** no intervals ({no_interval_reason(rows, videos)}); point differences only, which "
                "cannot tell an effect from noise.")
    counts = iv.multiplicity([r for r in rows if not r.get("optimistic")])
    size = f"{videos} validation recordings, {seeds} seed{'s' if seeds != 1 else ''} per cell at most"
    pairs: dict[tuple[str, str, bool], list[str]] = {}
    for r in rows:
        if r.get("holds") and not r.get("optimistic"):  # an in-split tuned / selected figure is no finding
            recipe = r.get("seeds", 1) >= 2
            pairs.setdefault((r["who"], r["ref"], recipe), []).append(
                f"{METRIC_LABEL[r['metric']]} {bs.fmt_ci(r['diff'], r['ci'], signed=True)}")
    found = []
    for (who, ref, recipe), diffs in pairs.items():
        if recipe:
            found.append(f"recipe {who} over {ref} (seeds resampled): " + ", ".join(diffs))
        else:
            found.append(f"this model {who} vs that model {ref} (one seed: says nothing about the recipes): "
                         + ", ".join(diffs))
    optimistic = (" Rows tuned or selected on the split they are scored on are left out (optimistic)."
                  if any(r.get("optimistic") for r in rows) else "")
    multi = " " + iv.multiplicity_line(counts)
    if not found:
        return (f"**{topic}:** no difference holds at this size ({size}) once the {counts['examined']} intervals are "
                f"adjusted together.{multi}{optimistic}")
    return f"**{topic}:** " + "; ".join(found) + f" ({size}).{multi}{optimistic}"


def spread(cell: Cell, metric: str, variant: str = "eval") -> str:
    """``mean ± sd`` over seeds (sd with n − 1), or the single value."""
    vals = cell.values(metric, variant)
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def _row(who: str, ref: str, metric: str, diff: dict[str, Any]) -> dict[str, Any]:
    return {"who": who, "ref": ref, "metric": metric, **diff}


def uni_vs_mtl_rows(cells: Sequence[Cell], rs: Resampler) -> list[dict[str, Any]]:
    """Every per-frame multi-task cell against the best uni-task model of each task (P_MTL: the
    three uni-task models' scores summed, three networks against one)."""
    uni = best_uni(cells)
    side_u, point_u = uni_side(rs, uni)
    rows = []
    for c in cells:
        if c.kind.mtl and c.kind.per_frame and c.kind.label_fraction == 1.0:
            side = rs.side(c.runs)
            for m in MAIN_METRICS:
                rows.append(_row(f"`{c.name}`", "uni-task", m,
                                 compare(side, side_u, m, c.mean(m), point_u[m], seed=rs.seed)))
    return rows


def variant_rows(cells: Sequence[Cell], rs: Resampler, question: str) -> list[dict[str, Any]]:
    """Cells one setting away from a reference cell (``question``: ``init`` or ``loss``)."""
    rows = []
    for q, c, ref in variant_pairs(cells):
        if q == question:
            a, b = rs.side(c.runs), rs.side(ref.runs)
            rows += [_row(f"`{c.name}`", f"`{ref.name}`", m, compare(a, b, m, c.mean(m), ref.mean(m), seed=rs.seed))
                     for m in metrics_of(c.kind)]
    return rows


def best_is_start(cell: Cell) -> bool:
    """Whether every run of a temporal cell kept its start (best.pt is step 0: no step improved)."""
    return bool(cell.kind.temporal) and all(
        r.eval.get("best_is_start", r.eval.get("step") == 0) for r in cell.runs)


def temporal_rows(cells: Sequence[Cell], rs: Resampler) -> list[dict[str, Any]]:
    """Per per-frame source cell: smoothing (tuned on val, cross-validated) and each temporal head
    on its features (and with smoothing), against the per-frame model itself. A temporal head's
    rows are optimistic: its best.pt was selected on this split with the start (the per-frame
    predictions) among the candidates, so it cannot score below the start by construction."""
    rows = []
    for src in cells:
        heads = [t for t in cells if t.kind.temporal and t.kind.init == src.name]
        if src.kind.temporal or not (heads or any(r.smoothed for r in src.runs)):
            continue
        base = rs.side(src.runs)
        for cell, label in ((src, "per-frame"), *((t, t.kind.temporal) for t in heads)):
            start = " (best is the start: no step improved)" if best_is_start(cell) else ""
            for variant, suffix in VARIANT_LABEL.items():
                if cell is src and variant == "eval" or not cell.values(MAIN_METRICS[-1], variant):
                    continue
                side = rs.side(cell.runs, variant)
                for m in MAIN_METRICS:
                    row = _row(f"`{cell.name}` {label}{suffix}{start}", f"`{src.name}` per-frame", m,
                               compare(side, base, m, cell.mean(m, variant), src.mean(m), seed=rs.seed))
                    # tuned on the split it is scored on, or selected there with the start as a candidate
                    rows.append({**row, "optimistic": variant == "smoothed" or cell is not src})
    return rows
