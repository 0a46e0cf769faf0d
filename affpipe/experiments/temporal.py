"""The grid's temporal cells: embed a finished per-frame run, smoothed evaluations.

``ensure_features`` writes ``<runs>/../data/features/<run>/`` from ``<runs>/<run>/best.pt`` once;
``smoothed_eval`` evaluates a finished run (per-frame or temporal) with smoothing windows tuned
on validation and keeps the result beside ``eval.json`` as ``eval_smoothed.json`` (plus
``smoothing.json``), leaving the trainer's own ``eval.json`` untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SMOOTHED_STEM = "eval_smoothed"


def features_dir(runs_dir: Path, source_run: str) -> Path:
    """Where the grid keeps the feature table of ``source_run``'s best.pt."""
    return Path(runs_dir).parent / "data" / "features" / source_run


def ensure_features(runs_dir: Path, source_run: str, shards: Path) -> Path:
    """Embed ``source_run``'s best.pt over every split of ``shards`` unless done (resumes a killed embed)."""
    from affpipe.loaders import LoaderConfig
    from affpipe.temporal.embed import EmbedConfig, embed
    from affpipe.temporal.features import TABLE_FILE

    out = features_dir(runs_dir, source_run)
    if not (out / TABLE_FILE).is_file():
        log.info("experiments: embedding %s into %s", source_run, out)
        # In-process loader work without worker processes: forked DataLoader workers can hang
        # on the thread pools the data preparation left behind (see grid.train_run).
        embed(EmbedConfig(source=str(Path(runs_dir) / source_run / "best.pt"), shards=Path(shards), out=out,
                          loader=LoaderConfig(num_workers=0), batch_size=128))
    return out


def smoothed_eval(run_dir: Path, shards: Path) -> dict[str, Any]:
    """Validation metrics of ``run_dir``'s best.pt with smoothing tuned on validation (cached)."""
    import json

    from affpipe.loaders import LoaderConfig
    from affpipe.runs.evaluate import apply_smoothing, collect, run_folder_for_writing
    from affpipe.runs.open import RunInputs, open_run
    from affpipe.train.evaluate import report_evaluation, write_eval

    path = Path(run_dir) / f"{SMOOTHED_STEM}.json"
    if path.is_file():
        return json.loads(path.read_text())
    temporal = bool(json.loads((Path(run_dir) / "config.json").read_text()).get("features"))
    run = open_run(RunInputs(run=Path(run_dir), shards=None if temporal else Path(shards)))
    with run_folder_for_writing(run.folder):
        c = collect(run, "val", loader=LoaderConfig(num_workers=0))
        extra = apply_smoothing(run, c, "val", smooth=False, tune_smoothing=True, write=True)
        result = report_evaluation(c.acc, c.frames, run.cfg, run.ckpt, run.state, "val", write=False, extra=extra,
                                   videos=c.video)
        result["note"] = "smoothing windows tuned on this split (val): optimistic, as tuned AU thresholds are"
        write_eval(run.folder, result, stem=SMOOTHED_STEM)
    return result


# ---- the report's "temporal context" table -------------------------------------------------

_METRICS = ("va_ccc", "expr_f1", "au_f1", "p_mtl")


def source_run_name(features: Path) -> str:
    """The run whose checkpoint a feature table was embedded from (else the table's folder name)."""
    import json

    try:
        source = json.loads((Path(features) / "manifest.json").read_text()).get("source_checkpoint")
    except (OSError, ValueError):
        source = None
    return Path(source).parent.name if source and source.endswith(".pt") else Path(features).name


def temporal_rows(runs) -> list[dict[str, Any]]:
    """Per source run with temporal heads or smoothing: per-frame, + smoothing, each head (and
    + smoothing), with every metric and its difference to the per-frame run."""
    sources = [r for r in runs if not r.kind.temporal and (r.smoothed or any(
        t.kind.temporal and t.kind.init == r.name for t in runs))]
    rows: list[dict[str, Any]] = []
    for src in sources:
        base = src.eval
        cands = [(f"`{src.name}` per-frame", base, None), (f"`{src.name}` per-frame + smoothing", src.smoothed, src.smoothed)]
        for t in runs:
            if t.kind.temporal and t.kind.init == src.name:
                cands += [(f"`{t.name}` {t.kind.temporal}", t.eval, None),
                          (f"`{t.name}` {t.kind.temporal} + smoothing", t.smoothed, t.smoothed)]
        for label, ev, sm in cands:
            if ev is None:
                continue
            row = {"source": src.name, "model": label,
                   "windows": (sm or {}).get("smoothing", {}).get("windows") if sm else None}
            for m in _METRICS:
                v, b = ev.get(m), base.get(m)
                row[m] = (v, v - b if isinstance(v, float | int) and isinstance(b, float | int) else None)
            rows.append(row)
    return rows


def temporal_section(runs) -> list[str]:
    """The report's markdown table of ``temporal_rows`` (nothing when there are none)."""
    from affpipe.experiments.report import METRIC_LABEL, _table, fmt

    rows = temporal_rows(runs)
    if not rows:
        return []
    header = ["model"] + [x for m in _METRICS for x in (METRIC_LABEL[m], "Δ")] + ["smoothing windows"]
    body = [[r["model"]] + [x for m in _METRICS for x in (fmt(r[m][0]), fmt(r[m][1], signed=True))]
            + [", ".join(f"{t} {w}" for t, w in (r["windows"] or {}).items()) or "—"] for r in rows]
    return ["## Temporal context: per-frame vs smoothing vs temporal heads", "",
            "Validation metrics of a per-frame run, of the same checkpoint with per-video smoothing, and of "
            "temporal heads trained on that run's frame features (`affpipe embed`); Δ = row − per-frame. "
            "Smoothing windows are tuned on the validation split they are reported on (optimistic, as tuned "
            "AU thresholds are; window 1 = none is a candidate, so they never lower a score there).", "",
            *_table(header, body)]
