"""``affpipe evaluate`` / ``predict`` for temporal runs, and smoothing for every run.

A temporal run's checkpoint names its feature table (which names the label index), so it needs
no ``--shards``; a per-frame run is evaluated on shards as before. Either way the predictions
land in a ``MetricAccumulator``; ``--smooth`` applies the windows of ``smoothing.json``,
``--tune-smoothing`` picks them on this split first (and saves them beside the checkpoint);
then the usual result / AU-threshold / prediction-file code of ``affpipe.train`` runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from affpipe.loaders.base import LoaderConfig
from affpipe.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Collected:
    """A checkpoint's predictions over one split, with what reporting them needs."""

    acc: Any  # MetricAccumulator
    frames: int
    cfg: TrainConfig
    ckpt: Path
    state: dict
    label_table: pa.Table
    index: Path
    table_name: str  # "frames" or "mtl": the label table the run was trained on


def is_temporal_run(run_or_ckpt: Path) -> bool:
    """Whether a run folder (its ``config.json``) or checkpoint holds a temporal head."""
    from affpipe.train.checkpoint import load_checkpoint, resolve_checkpoint

    ckpt = resolve_checkpoint(Path(run_or_ckpt))
    config = ckpt.parent / "config.json"
    data = json.loads(config.read_text()) if config.is_file() else load_checkpoint(ckpt)["config"]
    return bool(data.get("features"))


def collect(run_or_ckpt: Path, shards: Path | None, split: str, *, batch_size: int | None = None,
            device: str = "auto", loader: LoaderConfig | None = None, max_steps: int | None = None) -> Collected:
    """Run a checkpoint (per-frame on ``shards``, temporal on its feature table) over ``split``."""
    from affpipe.dist import pick_device
    from affpipe.index.build import load_index
    from affpipe.shards.format import manifest_index, read_manifest
    from affpipe.temporal.train import TemporalData, build_model_for
    from affpipe.train.checkpoint import load_checkpoint, resolve_checkpoint
    from affpipe.train.config import from_dict
    from affpipe.train.evaluate import eval_loader, evaluate_model, load_model

    ckpt = resolve_checkpoint(Path(run_or_ckpt))
    dev = pick_device(device)
    state = load_checkpoint(ckpt, map_location="cpu")
    cfg = from_dict(state["config"], source=f"{ckpt} (config)")
    if cfg.is_temporal:
        data = TemporalData.open(cfg.features)
        model = build_model_for(cfg, data.table.dim)
        model.load_state_dict(state["model"])
        model = model.to(dev).eval()
        batches = data.loader(split, cfg, train=False, device=dev, batch_size=batch_size)
        table, index = data.label_table, data.index
        table_name = data.table.manifest.get("table", "frames")
    else:
        if shards is None:
            raise ValueError(f"{ckpt} is a per-frame model: give --shards")
        model, cfg, state = load_model(ckpt, dev)
        batches = eval_loader(shards, split, cfg, dev, batch_size=batch_size, loader=loader)
        manifest = read_manifest(shards)
        index = manifest_index(shards, manifest)
        table_name = manifest.get("table", "frames")
        table, _ = load_index(index, table=table_name)
    acc, frames = evaluate_model(model, batches, cfg.heads, device=dev, amp=cfg.amp, max_steps=max_steps)
    return Collected(acc, frames, cfg, ckpt, state, table, index, table_name)


def frames_of(acc: Any, label_table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """``(video, frame)`` of each row ``acc`` holds, in its order."""
    rid = label_table.column("row_id").to_numpy()
    order = np.argsort(rid)
    want = acc.state()["row_id"]
    pos = order[np.clip(np.searchsorted(rid[order], want), 0, max(len(rid) - 1, 0))]
    if len(want) and not (rid[pos] == want).all():
        raise ValueError("predictions hold row ids the label table lacks")
    return label_table.column("video").to_numpy(zero_copy_only=False)[pos], label_table.column("frame").to_numpy()[pos]


def apply_smoothing(c: Collected, split: str, *, smooth: bool, tune_smoothing: bool, write: bool) -> dict[str, Any]:
    """Smooth ``c.acc`` in place (tuned on ``split`` or from ``smoothing.json``); the result's
    ``smoothing`` entry (windows, where they were tuned, the unsmoothed scores), or {}."""
    from affpipe.io import jsonable
    from affpipe.temporal import smoothing as sm
    from affpipe.train.predict import saved_au_thresholds

    if not (smooth or tune_smoothing):
        return {}
    video, frame = frames_of(c.acc, c.label_table)
    info: dict[str, Any] = {}
    if tune_smoothing:
        windows, scores = sm.tune(c.acc, video, frame, au_thresholds=saved_au_thresholds(c.ckpt, c.cfg.heads))
        info.update(tuned_on=split, scores=scores)
        if write:
            sm.save_windows(c.ckpt.parent, windows, split=split, checkpoint=c.ckpt.name, scores=scores)
    else:
        windows, info["tuned_on"] = sm.load_windows(c.ckpt.parent, with_split=True)
    before = c.acc.compute()
    info["unsmoothed"] = {k: before[k] for k in ("va_ccc", "expr_f1", "au_f1", "p_mtl") if k in before}
    c.acc = sm.smooth(c.acc, video, frame, windows)
    info["windows"] = {t: w for t, w in windows.items() if t in c.cfg.heads}
    return {"smoothing": jsonable(info)}


def evaluate_run(run_or_ckpt: Path, shards: Path | None = None, *, split: str = "val", tune_au_thresholds: bool = False,
                 smooth: bool = False, tune_smoothing: bool = False, batch_size: int | None = None,
                 device: str = "auto", loader: LoaderConfig | None = None, max_steps: int | None = None,
                 write: bool = True) -> dict[str, Any]:
    """``affpipe.train.evaluate.evaluate`` for any run, temporal or per-frame, with smoothing."""
    from affpipe.train.evaluate import report_evaluation

    c = collect(run_or_ckpt, shards, split, batch_size=batch_size, device=device, loader=loader, max_steps=max_steps)
    extra = apply_smoothing(c, split, smooth=smooth, tune_smoothing=tune_smoothing, write=write)
    return report_evaluation(c.acc, c.frames, c.cfg, c.ckpt, c.state, split, tune_au_thresholds=tune_au_thresholds,
                             write=write, extra=extra, videos=frames_of(c.acc, c.label_table)[0])


def predict_run(ckpt: Path, shards: Path | None, out: Path, fmt: str = "abaw-per-video", *, split: str = "val",
                smooth: bool = False, batch_size: int | None = None, device: str = "auto",
                loader: LoaderConfig | None = None, au_thresholds: list[float] | None = None,
                templates: tuple[Path, ...] = (), fill_missing: bool = False, edition: str = "abaw3") -> dict[str, Any]:
    """``affpipe.train.predict.predict`` for any run, temporal or per-frame, with smoothing."""
    from affpipe.train.predict import (
        FORMATS,
        check_video_names,
        frame_table,
        saved_au_thresholds,
        write_predictions,
    )

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    c = collect(ckpt, shards, split, batch_size=batch_size, device=device, loader=loader)
    if fmt == "mtl" and set(c.cfg.heads) != {"va", "expr", "au"}:
        raise ValueError(f"--format mtl needs a multi-task model; {c.ckpt} has heads {c.cfg.heads}")
    summary_extra = apply_smoothing(c, split, smooth=smooth, tune_smoothing=False, write=False)
    thresholds = saved_au_thresholds(c.ckpt, c.cfg.heads) if au_thresholds is None else au_thresholds
    frames = frame_table(c.index, c.table_name, split)
    check_video_names(frames[1], f"the label table of {c.index}")
    summary = write_predictions(c.acc.predictions(au_thresholds=thresholds), c.cfg.heads, frames, out, fmt,
                                split=split, checkpoint=c.ckpt, au_thresholds=thresholds, templates=tuple(templates),
                                fill_missing=fill_missing, edition=edition)
    summary.update(summary_extra)
    return summary
