"""``affpipe predict RUN --video VIDEO|DIR… -o OUT``: a run's predictions on your own videos.

A video is an input, not a kind of run: ``crop`` (``affpipe.video``) turns it into aligned crops
in ``OUT/crops`` (a crop tree, owned by ``crop``: a rerun reuses it), and the run's model reads
each track's crops, in time order, through ``Run.predict`` (the kind provides the crop model,
``affpipe.run.crops``: a per-frame run reads each crop alone; a temporal run embeds the crops with
the frozen encoders of its feature tables and averages its windows over the track's frames,
frames without a face being gaps; a kind that does not read images refuses in one line before
any work). Written per track (a face
followed through the video: ``<video>``, ``<video>_left``/``_right``, …; a video with no face at
all gets one file named after it, every row empty):

- ``OUT/<track>.csv`` and ``.parquet``: one row per decoded frame of the video: ``frame``,
  ``time``, ``face`` (1 where the track has a crop), ``valence``, ``arousal``, the 8 expression
  probabilities (softmax, ``p_<class>``), ``expr`` (the argmax class), the 12 AU probabilities
  (sigmoid, ``p_<AU>``) and the 12 AU labels (the run's tuned ``au_thresholds.json`` when there
  is one, else 0.5; the summary says which). Frames without a face have empty predictions
  (counted), never values made up.
- ``OUT/<track>.png``: VA over time, the expression probabilities stacked, an AU heat strip and
  face thumbnails along the time axis; ``--overlay``: ``OUT/<video>.overlay.avi``, the video with
  each face's box, landmarks, current VA and top expression.
- ``OUT/summary.json``: what was predicted, with which thresholds and smoothing.

OUT is owned by ``predict --video`` (``affpipe.outdir``); every file is written atomically from
the crops and the model, so a rerun (after a kill too) ends in the same bytes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from affpipe.labels import AU_NAMES, EXPR_CLASSES
from affpipe.outdir import Owner

log = logging.getLogger(__name__)

CROPS = "crops"
VIDEO_OWNER = Owner("predict-video", (f"{CROPS}/**", "*.csv", "*.parquet", "*.png", "*.overlay.avi", "summary.json"))


@dataclass(frozen=True, kw_only=True)
class VideoPredictConfig:
    """What ``predict --video`` does (see the module docstring)."""

    run: Path  # a run folder, a checkpoint or an exported .safetensors file
    videos: tuple[Path, ...]
    out: Path
    smooth: bool = False
    au_thresholds: tuple[float, ...] | None = None  # None: the run's tuned ones, else 0.5
    overlay: bool = False
    device: str = "auto"
    batch_size: int = 64
    overwrite: bool = False
    progress: bool = True
    crop: dict[str, Any] = field(default_factory=dict)  # CropConfig options (min_track, min_score, …)
    features: tuple[Path, ...] = ()  # a temporal run's feature tables, when not where its lineage says

    def __post_init__(self) -> None:
        if not self.videos:
            raise ValueError("predict --video: give at least one video file or folder")


def columns() -> list[str]:
    """The columns of a track's table, in order."""
    return (["frame", "time", "face", "valence", "arousal"] + [f"p_{c}" for c in EXPR_CLASSES] + ["expr"]
            + [f"p_{a}" for a in AU_NAMES] + list(AU_NAMES))


def predict_video(cfg: VideoPredictConfig) -> dict[str, Any]:
    """Crop, predict and write (see the module docstring); returns the summary."""
    import torch

    from affpipe.dist import pick_device
    from affpipe.io import atomic_write_text, sha256_file
    from affpipe.outdir import claim
    from affpipe.runs.open import RunInputs, open_run
    from affpipe.video.crop import CropConfig, crop
    from affpipe.video.sources import find_sources, probe

    run = open_run(RunInputs(run=Path(cfg.run)), data=False)
    dev = pick_device(cfg.device)
    model = run.image_model(dev, features=cfg.features)  # a run that cannot read crops refuses here, before any work
    sources, _ = find_sources(tuple(Path(p) for p in cfg.videos))
    for s in sources:
        probe(s)
    tuned = run.au_thresholds() if cfg.au_thresholds is None and "au" in run.cfg.heads else None
    thresholds = list(cfg.au_thresholds) if cfg.au_thresholds is not None else tuned or [0.5] * len(AU_NAMES)
    how = ("given (--au-thresholds)" if cfg.au_thresholds is not None
           else f"tuned, from {run.ckpt if run.exported else run.files.thresholds}" if tuned else "0.5 (none tuned)")
    windows = run.smoothing_windows() if cfg.smooth else {}
    crop_cfg = CropConfig(inputs=tuple(cfg.videos), out=Path(cfg.out) / CROPS, device=cfg.device,
                          overwrite=cfg.overwrite, progress=cfg.progress, **cfg.crop)
    inputs = {"checkpoint_sha256": sha256_file(run.ckpt), "smooth": windows, "au_thresholds": thresholds,
              "crop": crop_cfg.settings()} | {f"source {s.name}": s.fingerprint() for s in sources}
    with claim(cfg.out, VIDEO_OWNER, inputs, overwrite=cfg.overwrite) as folder:
        cropped = crop(crop_cfg)
        tracks: list[dict[str, Any]] = []
        with torch.inference_mode():
            for rec in cropped["per_video"]:
                tracks += _predict_one(run, model, folder, rec, thresholds, windows, cfg)
        summary = {"run": str(run.ckpt), "exported": run.exported, "kind": run.kind.name, "heads": list(run.cfg.heads),
                   "au_thresholds": thresholds, "au_thresholds_from": how, "smoothing": windows,
                   "videos": len(cropped["per_video"]), "frames": cropped["frames"], "tracks": tracks,
                   "frames_without_face": sum(t["rows_empty"] for t in tracks)}
        atomic_write_text(folder.path("summary.json"), json.dumps(summary, indent=1, sort_keys=True) + "\n")
        summary["crops_reused"] = cropped["resumed"]  # not in the file: a rerun writes the same bytes
    log.info("predicted %d track(s) of %d video(s) under %s", len(tracks), summary["videos"], cfg.out)
    return summary


def _predict_one(run, model, folder, rec: dict, thresholds: list[float], windows: dict[str, int],
                 cfg: VideoPredictConfig) -> list[dict[str, Any]]:
    """Every track of video ``rec["name"]``: predictions, table, plot (and the overlay)."""
    import pyarrow.parquet as pq

    from affpipe.runs.video_plots import write_overlay, write_plot

    crops = Path(cfg.out) / CROPS
    table = pq.read_table(crops / "crop_tables" / f"{rec['name']}.parquet").to_pydict()
    frames = np.unique(np.asarray(table["frame"], np.int64))
    times = dict(zip(table["frame"], table["time"], strict=True))
    names = list(rec["tracks"]) or [rec["name"]]
    out, per_track = [], {}
    for name in names:
        image = {f: img for f, folder_, img in zip(table["frame"], table["folder"], table["image"], strict=True)
                 if folder_ == name and img}
        have = np.array([f in image for f in frames], bool)
        crops_rgb = [_read_rgb(crops / "cropped_aligned" / image[f]) for f in frames[have]]
        pred = run.predict(crops_rgb, frames[have], batch_size=cfg.batch_size, model=model)
        pred = _smoothed(pred, frames[have], windows)
        t = _track_table(frames, [times[f] for f in frames], have, pred, thresholds)
        _write_table(folder, name, t)
        write_plot(folder.path(f"{name}.png"), name, t, crops_rgb, frames[have])
        per_track[name] = (t, image)
        out.append({"track": name, "video": rec["name"], "rows": len(frames), "rows_with_face": int(have.sum()),
                    "rows_empty": int((~have).sum()), "files": [f"{name}.csv", f"{name}.parquet", f"{name}.png"]})
    if cfg.overlay and rec.get("kind", "video") == "video":
        write_overlay(folder.path(f"{rec['name']}.overlay.avi"), Path(rec["source"]), table, per_track)
        out[-1]["files"].append(f"{rec['name']}.overlay.avi")
    return out


def _read_rgb(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: a crop that cannot be decoded; rerun with --overwrite to crop again")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _smoothed(pred: dict[str, np.ndarray], frames: np.ndarray, windows: dict[str, int]) -> dict[str, np.ndarray]:
    """``pred`` smoothed over the track's frames with the run's windows (as ``predict --smooth``)."""
    from affpipe.temporal.smoothing import moving_average

    if not windows or not len(frames):
        return pred
    video = np.zeros(len(frames), np.int64)
    out = dict(pred)
    if windows.get("va", 1) > 1 and "valence" in pred:
        va = moving_average(np.stack([pred["valence"], pred["arousal"]], 1), video, frames, windows["va"])
        out["valence"], out["arousal"] = va[:, 0], va[:, 1]
    for task, key in (("expr", "expr_probs"), ("au", "au_probs")):
        if windows.get(task, 1) > 1 and key in pred:
            out[key] = moving_average(pred[key], video, frames, windows[task])
    return out


def _track_table(frames: np.ndarray, times: list, have: np.ndarray, pred: dict[str, np.ndarray],
                 thresholds: list[float]) -> pa.Table:
    """One row per frame; rows without a face (or a head the run lacks) are null."""
    n = len(frames)

    def spread(values: np.ndarray | None, dtype) -> pa.Array:
        full = np.zeros(n, dtype)
        if values is not None:
            full[have] = values
        return pa.array(full, mask=~have if values is not None else np.ones(n, bool))

    cols: dict[str, pa.Array] = {"frame": pa.array(frames.astype(np.int32)),
                                 "time": pa.array(times, pa.float64()), "face": pa.array(have.astype(np.int8))}
    cols["valence"] = spread(pred.get("valence"), np.float32)
    cols["arousal"] = spread(pred.get("arousal"), np.float32)
    probs = pred.get("expr_probs")
    for j, c in enumerate(EXPR_CLASSES):
        cols[f"p_{c}"] = spread(None if probs is None else probs[:, j], np.float32)
    arg = None if probs is None else np.array(EXPR_CLASSES, object)[probs.argmax(1)] if len(probs) else np.zeros(0, object)
    full = np.full(n, None, object)
    if arg is not None:
        full[have] = arg
    cols["expr"] = pa.array(full.tolist(), pa.string())
    au = pred.get("au_probs")
    for j, a in enumerate(AU_NAMES):
        cols[f"p_{a}"] = spread(None if au is None else au[:, j], np.float32)
    for j, a in enumerate(AU_NAMES):
        cols[a] = spread(None if au is None else (au[:, j] >= thresholds[j]).astype(np.int8), np.int8)
    return pa.table(cols)


def _write_table(folder, name: str, t: pa.Table) -> None:
    """``<name>.parquet`` and ``<name>.csv`` (empty cells where null; floats with 6 decimals)."""
    from affpipe.io import atomic_write_text, write_parquet

    write_parquet(t, folder.path(f"{name}.parquet"), compression="zstd")
    cols = t.to_pydict()
    lines = [",".join(t.column_names)]
    for i in range(t.num_rows):
        cells = []
        for k in t.column_names:
            v = cols[k][i]
            cells.append("" if v is None else f"{v:.6f}" if isinstance(v, float) else str(v))
        lines.append(",".join(cells))
    atomic_write_text(folder.path(f"{name}.csv"), "\n".join(lines) + "\n")
