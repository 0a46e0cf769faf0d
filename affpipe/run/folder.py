"""The run folder, owned here: every file a run holds is named in this module and read or
written through one typed function. The ownership list (``RUN_OWNER``: what ``train`` writes and
what ``evaluate`` and its tuning options add) is derived from ``RUN_FILES``, never kept by hand.

    RUN/config.json       the resolved config (also inside every checkpoint)
        lineage.json      what the run trained on (``affpipe.run.data``)
        metrics.jsonl     one JSON record a line: train windows, epochs, validations, init
        curves.png        the training curves, redrawn every epoch
        last.pt, best.pt  checkpoints (``affpipe.run.checkpoint``), step-<N>.pt when kept
        eval[_<variant>].json/.md, eval[_<variant>]_predictions.npz
                          an evaluation: metrics with intervals, tables, per-frame predictions
        eval[_<variant>]_{confusion,au_pr,va_videos}.png
                          evaluate's diagnostic plots (``affpipe.run.diagnostics``)
        au_thresholds.json, smoothing.json
                          tuned on validation by ``evaluate`` (which checkpoint they belong to inside)
        events.out.tfevents.*   TensorBoard (``affpipe.run.tracking``)

No other module of affpipe spells one of these names (``tests/test_architecture.py`` checks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affpipe.io import atomic_write_text, jsonable, writing
from affpipe.outdir import Owner


@dataclass(frozen=True)
class RunFile:
    """One kind of file a run folder holds: its name (an ``fnmatch`` pattern where it varies),
    which verb writes it and what it is."""

    pattern: str
    writer: str
    what: str


CONFIG = "config.json"
LINEAGE = "lineage.json"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
LAST = "last.pt"
BEST = "best.pt"
THRESHOLDS = "au_thresholds.json"
SMOOTHING = "smoothing.json"
EVAL_STEM = "eval"  # evaluate's variants: eval_<split>, eval_smoothed, ...
TENSORBOARD = "events.out.tfevents.*"
# evaluate's diagnostic plots, one of each per evaluation stem: <stem>_<what>.png
DIAGNOSTICS = {"confusion": "the EXPR confusion matrix, each label's row normalized",
               "au_pr": "per-AU precision-recall curves, the threshold in use marked",
               "va_videos": "valence and arousal predictions against labels over frames, a few videos"}
CHECKPOINTS = (BEST, LAST)  # what a run folder opens as, in this order

RUN_FILES: tuple[RunFile, ...] = (
    RunFile(CONFIG, "train", "the resolved config"),
    RunFile(LINEAGE, "train", "what the run trained on"),
    RunFile(METRICS, "train", "the run log"),
    RunFile(CURVES, "train", "training curves"),
    RunFile(LAST, "train", "the latest checkpoint"),
    RunFile(BEST, "train", "the checkpoint of the best validation score"),
    RunFile("step-*.pt", "train", "a checkpoint kept at a step"),
    RunFile(f"{EVAL_STEM}*.json", "train, evaluate", "an evaluation's metrics"),
    RunFile(f"{EVAL_STEM}*.md", "train, evaluate", "an evaluation's tables"),
    RunFile(f"{EVAL_STEM}*_predictions.npz", "train, evaluate", "an evaluation's per-frame predictions"),
    *(RunFile(f"{EVAL_STEM}*_{what}.png", "evaluate", desc) for what, desc in DIAGNOSTICS.items()),
    RunFile(THRESHOLDS, "evaluate --tune-au-thresholds", "tuned AU thresholds"),
    RunFile(SMOOTHING, "evaluate --tune-smoothing", "tuned smoothing windows"),
    RunFile(TENSORBOARD, "train --tensorboard", "TensorBoard event files"),
)
RUN_OWNER = Owner("train", tuple(f.pattern for f in RUN_FILES))
# What a run produced that is worth keeping: a folder holding one of these is never reused or
# emptied without --overwrite (the run log of a run that never reached a step may be).
RESULTS = (LAST, BEST, "step-*.pt", f"{EVAL_STEM}*", THRESHOLDS, SMOOTHING)


def eval_stem(split: str = "val", *, smoothed: bool = False, cross_validated: bool = False) -> str:
    """The stem of an evaluation's files: ``eval``, ``eval_<split>``, ``+ _smoothed`` (``+ _cv``):
    each variant has files of its own, so a smoothed (or other-split) evaluation never replaces
    the raw figures of ``eval.json``/``eval.md``."""
    stem = EVAL_STEM if split == "val" else f"{EVAL_STEM}_{split}"
    return stem + ("_smoothed" if smoothed else "") + ("_cv" if cross_validated else "")


def predictions_name(stem: str = EVAL_STEM) -> str:
    """The per-frame predictions file of the evaluation ``stem``."""
    return f"{stem}_predictions.npz"


class RunFolder:
    """A run folder's files by role (paths, and the typed readers and writers)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ---- paths -----------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def lineage(self) -> Path:
        return self.path / LINEAGE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def curves(self) -> Path:
        return self.path / CURVES

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def thresholds(self) -> Path:
        return self.path / THRESHOLDS

    @property
    def smoothing(self) -> Path:
        return self.path / SMOOTHING

    def checkpoint(self, name: str) -> Path:
        """``best.pt``/``last.pt`` (or a kept ``step-<N>.pt``) of this run."""
        if not RUN_OWNER.owns(name) or not name.endswith(".pt"):
            raise ValueError(f"{self.path}: {name!r} is not a checkpoint name of a run folder")
        return self.path / name

    def eval_json(self, stem: str = EVAL_STEM) -> Path:
        return self.path / f"{stem}.json"

    def eval_md(self, stem: str = EVAL_STEM) -> Path:
        return self.path / f"{stem}.md"

    def predictions(self, stem: str = EVAL_STEM) -> Path:
        return self.path / predictions_name(stem)

    def diagnostic(self, stem: str, what: str) -> Path:
        """evaluate's plot ``what`` (a key of ``DIAGNOSTICS``) of the evaluation ``stem``."""
        if what not in DIAGNOSTICS:
            raise ValueError(f"no diagnostic plot {what!r} (one of {sorted(DIAGNOSTICS)})")
        return self.path / f"{stem}_{what}.png"

    # ---- config ----------------------------------------------------------------------------
    def has_config(self) -> bool:
        return self.config.is_file()

    def read_config(self) -> dict[str, Any]:
        """``config.json`` as a dict (a damaged one is an error naming the file)."""
        return _read_json(self.config, "a run's config")

    def write_config(self, text: str, resolved: Mapping[str, Any] | None = None) -> None:
        """``text`` (``config_json``: what was asked, ``auto`` values as given) with, under
        ``RESOLVED_KEY``, what they resolved to on this machine (device, amp, loader backend).
        That section is a record only: recipes and ``--resume`` comparisons ignore it."""
        if resolved:
            from affpipe.run.config import RESOLVED_KEY

            data = json.loads(text)
            data[RESOLVED_KEY] = jsonable(dict(resolved))
            text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        atomic_write_text(self.config, text)

    # ---- lineage ---------------------------------------------------------------------------
    def read_lineage_raw(self) -> dict[str, Any] | None:
        """``lineage.json`` as a dict, None when the run predates it."""
        if not self.lineage.is_file():
            return None
        return _read_json(self.lineage, "a run lineage", hint="rewrite it with `affpipe train --resume`")

    def write_lineage(self, lineage: Mapping[str, Any]) -> None:
        atomic_write_text(self.lineage, json.dumps(dict(lineage), indent=2, sort_keys=True) + "\n")

    # ---- metrics.jsonl ---------------------------------------------------------------------
    def append_metrics(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record to ``metrics.jsonl`` (a full disk names the file); returns it as written."""
        rec = jsonable(dict(record))
        with writing(self.metrics), open(self.metrics, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        return rec

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl`` ([] when there is none; a line cut by a kill is skipped)."""
        from affpipe.run.checkpoint import read_metrics

        return read_metrics(self.metrics) if self.metrics.is_file() else []

    def truncate_metrics(self, *, step: int, epoch: int) -> int:
        """Drop what was logged after the checkpoint at ``step``/``epoch`` (a resume redoes it)."""
        from affpipe.run.checkpoint import truncate_metrics

        return truncate_metrics(self.metrics, step=step, epoch=epoch)

    # ---- evaluations -----------------------------------------------------------------------
    def has_eval(self, stem: str = EVAL_STEM) -> bool:
        return self.eval_json(stem).is_file()

    def read_eval(self, stem: str = EVAL_STEM) -> dict[str, Any]:
        return _read_json(self.eval_json(stem), "an evaluation")

    def write_eval(self, result: Mapping[str, Any], markdown: str, stem: str = EVAL_STEM) -> tuple[Path, Path]:
        """``<stem>.json`` (the metrics) and ``<stem>.md`` (its tables)."""
        js, md = self.eval_json(stem), self.eval_md(stem)
        atomic_write_text(js, json.dumps(jsonable(dict(result)), indent=2, sort_keys=True) + "\n")
        atomic_write_text(md, markdown)
        return js, md

    def eval_markdown_text(self, stem: str = EVAL_STEM) -> str | None:
        return self.eval_md(stem).read_text() if self.eval_md(stem).is_file() else None

    # ---- tuned state -----------------------------------------------------------------------
    def read_thresholds(self) -> dict[str, Any] | None:
        """``au_thresholds.json`` (None when not tuned)."""
        if not self.thresholds.is_file():
            return None
        return _read_json(self.thresholds, "an AU threshold file")

    def write_thresholds(self, record: Mapping[str, Any]) -> Path:
        atomic_write_text(self.thresholds, json.dumps(jsonable(dict(record)), indent=2, sort_keys=True) + "\n")
        return self.thresholds

    def read_smoothing(self) -> dict[str, Any]:
        if not self.smoothing.is_file():
            raise FileNotFoundError(f"--smooth: no {self.smoothing}; run `affpipe evaluate RUN --tune-smoothing` first")
        return _read_json(self.smoothing, "a smoothing file")

    def write_smoothing(self, record: Mapping[str, Any]) -> Path:
        atomic_write_text(self.smoothing, json.dumps(dict(record), indent=2) + "\n")
        return self.smoothing

    # ---- what the run produced ---------------------------------------------------------------
    def results(self) -> list[str]:
        """The names of the files in the folder that are results (``RESULTS``: checkpoints,
        evaluations, predictions, tuned state), sorted; [] for a new folder."""
        import fnmatch

        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if p.is_file() and any(fnmatch.fnmatchcase(p.name, r) for r in RESULTS))

    def logged_steps(self) -> int:
        """The highest optimizer step ``metrics.jsonl`` records (train and epoch lines; 0: none)."""
        return max((int(r.get("step", 0)) for r in self.read_metrics() if r.get("kind") in ("train", "epoch")),
                   default=0)

    # ---- which checkpoint ------------------------------------------------------------------
    def opened_checkpoint(self) -> Path:
        """The checkpoint a run folder opens as: ``best.pt``, else ``last.pt``."""
        for name in CHECKPOINTS:
            if (self.path / name).is_file():
                return self.path / name
        raise FileNotFoundError(f"{self.path} holds no {' or '.join(CHECKPOINTS)}")


def resolve_checkpoint(run_or_ckpt: Path | str) -> Path:
    """A run folder → its ``best.pt`` (else ``last.pt``); a file → itself."""
    path = Path(run_or_ckpt)
    if path.is_dir():
        return RunFolder(path).opened_checkpoint()
    if not path.is_file():
        raise FileNotFoundError(f"no run folder or checkpoint at {path}")
    return path


def _read_json(path: Path, what: str, *, hint: str = "") -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable as {what} ({exc}){'; ' + hint if hint else ''}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not {what} (not a JSON object)")
    return data
