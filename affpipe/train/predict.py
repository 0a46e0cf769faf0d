"""Predictions in the ABAW submission formats.

- ``abaw-per-video``: one ``<video>.txt`` per video and task under ``OUT/VA``, ``OUT/EXPR``,
  ``OUT/AU`` (ABAW1-4): a header (``valence,arousal``; the 8 class names; the 12 AU names),
  then one line per frame of the video in frame order.
- ``abaw-single``: one file per task (ABAW5+), ``OUT/VA.txt`` etc., header
  ``image_location,<columns>``, one row ``video/00001.jpg,...`` per frame.
- ``mtl``: ``OUT/MTL.txt``, header ``image,valence,arousal,expression,aus``, one row
  ``video/00001.jpg,v,a,e,au1,...,au12`` per image of the table's split.

A frame without a prediction (no face image, or not in the shards) gets the prediction of the
nearest frame of its video that has one (the earlier one on a tie), as ABAW participants did.
"Frames of a video" are 1..the largest frame number the label table holds for it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from affpipe.dist import pick_device
from affpipe.io import confined_path, safe_name
from affpipe.labels import AU_NAMES, EXPR_CLASSES
from affpipe.loaders.base import LoaderConfig
from affpipe.train.checkpoint import resolve_checkpoint
from affpipe.train.evaluate import THRESHOLDS_FILE, eval_loader, iterate_outputs, load_model

log = logging.getLogger(__name__)

FORMATS = ("abaw-per-video", "abaw-single", "mtl")
_DIRS = {"va": "VA", "expr": "EXPR", "au": "AU"}
_HEADERS = {"va": "valence,arousal", "expr": ",".join(EXPR_CLASSES), "au": ",".join(AU_NAMES)}


def _frame_table(shards: Path, split: str, index: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row_id, video, frame, has_image) of ``split`` from the label table the manifest names
    (``index`` overrides where that table is)."""
    from affpipe.shards.format import manifest_index, read_manifest

    manifest = read_manifest(shards, full=False)
    return frame_table(manifest_index(shards, manifest, index), manifest.get("table", "frames"), split)


def frame_table(index: Path, table_name: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row_id, video, frame, has_image) of ``split`` of an index's label table, in (video, frame) order."""
    import pyarrow.compute as pc

    from affpipe.index.build import load_index

    table, _ = load_index(index, table=table_name)
    table = table.filter(pc.equal(table.column("split"), split))
    table = table.sort_by([("video", "ascending"), ("frame", "ascending")])
    col = lambda name: table.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    return col("row_id").astype(np.int64), col("video").astype(object), col("frame").astype(np.int64), col("has_image").astype(bool)


def _fill_nearest(frames: np.ndarray, known_frames: np.ndarray) -> np.ndarray:
    """For each of ``frames``, the index into sorted ``known_frames`` of the nearest one."""
    right = np.clip(np.searchsorted(known_frames, frames), 0, len(known_frames) - 1)
    left = np.clip(right - 1, 0, len(known_frames) - 1)
    use_left = np.abs(frames - known_frames[left]) <= np.abs(known_frames[right] - frames)
    return np.where(use_left, left, right)


def _task_lines(task: str, pred: dict[str, np.ndarray], idx: np.ndarray) -> list[str]:
    if task == "va":
        return [f"{v:.6f},{a:.6f}" for v, a in pred["va"][idx]]
    if task == "expr":
        return [str(int(e)) for e in pred["expr"][idx]]
    return [",".join(str(int(x)) for x in row) for row in pred["au"][idx]]


def predict(ckpt: Path, shards: Path, out: Path, fmt: str = "abaw-per-video", *, split: str = "val",
            batch_size: int | None = None, device: str = "auto", loader: LoaderConfig | None = None,
            au_thresholds: list[float] | None = None, templates: tuple[Path, ...] = (),
            fill_missing: bool = False, edition: str = "abaw3", index: Path | None = None) -> dict[str, Any]:
    """Run a checkpoint over ``split`` of ``shards`` and write submission files under ``out``.

    AU thresholds: ``au_thresholds`` if given, else ``au_thresholds.json`` beside the
    checkpoint (from ``affpipe evaluate --tune-au-thresholds``), else 0.5. Returns a summary
    (files written, videos, lines, lines filled from a neighbouring frame, samples skipped).
    ``templates``: official test-set files whose header, rows and order the output follows
    (:mod:`affpipe.train.submission`); ``fill_missing`` gives their rows of unknown videos a
    default prediction instead of an error. ``edition`` (``abaw-per-video``): the headers of ABAW1
    (7 classes, 8 AUs), ABAW2 (7 classes) or ABAW3-4 (the default). ``index``: the label index
    when it is not where the shard manifest says.
    """
    from affpipe.train.metrics import MetricAccumulator

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    ckpt = resolve_checkpoint(Path(ckpt))
    dev = pick_device(device)
    model, cfg, _ = load_model(ckpt, dev)
    if fmt == "mtl" and set(cfg.heads) != {"va", "expr", "au"}:
        raise ValueError(f"--format mtl needs a multi-task model; {ckpt} has heads {cfg.heads}")
    au_thresholds = saved_au_thresholds(ckpt, cfg.heads) if au_thresholds is None else au_thresholds
    frames = _frame_table(Path(shards), split, index)
    check_video_names(frames[1], f"the label table of {Path(shards) / 'manifest.json'}")
    loader = eval_loader(shards, split, cfg, dev, batch_size=batch_size, loader=loader)
    acc = MetricAccumulator(cfg.heads)
    for outputs, batch in iterate_outputs(model, loader, device=dev, amp=cfg.amp):
        acc.update(outputs, batch)
    pred = acc.predictions(au_thresholds=au_thresholds)
    summary = write_predictions(pred, cfg.heads, frames, out, fmt, split=split, checkpoint=ckpt,
                                au_thresholds=au_thresholds, templates=tuple(templates), fill_missing=fill_missing,
                                edition=edition)
    summary["skipped"] = dict(getattr(loader, "skipped", {}))  # bad samples skipped (on_bad="skip"), by reason
    return summary



def check_video_names(video: np.ndarray, where: str) -> None:
    """Video names come from data: every one is checked before any work or write."""
    for name in np.unique(video).tolist():
        safe_name(str(name), f"{where}: video")


def saved_au_thresholds(ckpt: Path, heads: tuple[str, ...]) -> list[float] | None:
    """The AU thresholds ``affpipe evaluate --tune-au-thresholds`` stored beside ``ckpt`` (None: 0.5)."""
    path = Path(ckpt).parent / THRESHOLDS_FILE
    if "au" not in heads or not path.is_file():
        return None
    saved = json.loads(path.read_text())["au_thresholds"]
    log.info("using the tuned AU thresholds of %s", path)
    return [float(saved[name]) for name in AU_NAMES]


def write_predictions(pred: dict[str, np.ndarray], heads: tuple[str, ...], frames_of_split: tuple, out: Path,
                      fmt: str, *, split: str, checkpoint: Path, au_thresholds: list[float] | None,
                      templates: tuple[Path, ...] = (), fill_missing: bool = False,
                      edition: str = "abaw3") -> dict[str, Any]:
    """Submission files of ``pred`` (``MetricAccumulator.predictions``) for the frames
    ``frames_of_split`` (``frame_table``) lists, or row for row after ``templates``; returns the
    summary ``predict`` returns.

    (Over 60 lines: one pass over the videos fills all three formats' lines, nearest-frame fill
    included; the three writers at the end share what it collected.)
    """
    row_id, video, frame, has_image = frames_of_split
    ckpt = checkpoint
    n_rows = int(max(row_id.max(initial=-1), pred["row_id"].max(initial=-1))) + 1
    where = np.full(n_rows, -1, np.int64)  # row_id → position in pred
    where[pred["row_id"]] = np.arange(len(pred["row_id"]))
    if templates or edition != "abaw3":
        return _predict_templates(templates, fmt, pred, heads, (video, frame, where[row_id], has_image), out,
                                  fill_missing, {"split": split, "checkpoint": str(ckpt), "au_thresholds": au_thresholds},
                                  edition)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_task_lines: dict[str, list[str]] = {t: [] for t in heads}
    images: list[str] = []
    files: list[Path] = []
    filled = n_videos = 0
    bounds = np.flatnonzero(np.r_[True, video[1:] != video[:-1], True])
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        name = str(video[start])
        frames = frame[start:stop]
        pos = where[row_id[start:stop]]
        known = pos >= 0
        if fmt == "mtl":  # one row per image the table lists, not per video frame
            targets = frames[has_image[start:stop]]
        else:
            targets = np.arange(1, int(frames.max()) + 1)
        if not len(targets):
            continue
        n_videos += 1
        if not known.any():
            log.warning("%s: no frame has a prediction; writing the first stored prediction", name)
            idx = np.zeros(len(targets), np.int64)
            filled += len(targets)
        else:
            known_frames, known_pos = frames[known], pos[known]
            near = _fill_nearest(targets, known_frames)
            idx = known_pos[near]
            filled += int((known_frames[near] != targets).sum())
        names = [f"{name}/{f:05d}.jpg" for f in targets]
        if fmt == "abaw-per-video":
            for task in heads:
                # The name comes from data: it becomes a path only if it stays under OUT.
                path = confined_path(out, f"{_DIRS[task]}/{name}.txt", f"predict -o {out}")
                path.parent.mkdir(exist_ok=True)
                path.write_text(_HEADERS[task] + "\n" + "\n".join(_task_lines(task, pred, idx)) + "\n")
                files.append(path)
        else:
            images += names
            for task in heads:
                per_task_lines[task] += _task_lines(task, pred, idx)
    if fmt == "abaw-single":
        for task in heads:
            path = out / f"{_DIRS[task]}.txt"
            rows = (f"{img},{line}" for img, line in zip(images, per_task_lines[task], strict=True))
            path.write_text(f"image_location,{_HEADERS[task]}\n" + "\n".join(rows) + "\n")
            files.append(path)
    elif fmt == "mtl":
        path = out / "MTL.txt"
        rows = (f"{img},{va},{e},{au}" for img, va, e, au in
                zip(images, per_task_lines["va"], per_task_lines["expr"], per_task_lines["au"], strict=True))
        path.write_text("image,valence,arousal,expression,aus\n" + "\n".join(rows) + "\n")
        files.append(path)
    lines = len(images) if fmt != "abaw-per-video" else None
    summary = {"format": fmt, "split": split, "checkpoint": str(ckpt), "videos": n_videos,
               "predicted_frames": int(len(pred["row_id"])), "filled_from_neighbour": filled,
               "files": [str(f) for f in files], "lines": lines, "au_thresholds": au_thresholds}
    log.info("wrote %d file(s) for %d videos under %s (%d lines filled from a neighbouring frame)",
             len(files), n_videos, out, filled)
    return summary


def _predict_templates(templates: tuple[Path, ...], fmt: str, pred: dict[str, np.ndarray], heads: tuple[str, ...],
                       rows: tuple[np.ndarray, ...], out: Path, fill_missing: bool, extra: dict,
                       edition: str = "abaw3") -> dict[str, Any]:
    """``predict`` with ``--template``: the output follows each template row for row."""
    from affpipe.train.submission import index_predictions, write_from_templates

    video, frame, pos, has_image = rows
    p = index_predictions(pred, tuple(heads), video, frame, pos, has_image)
    summary = write_from_templates(tuple(templates), fmt, p, Path(out), fill_missing=fill_missing, edition=edition)
    summary.update(extra, predicted_frames=int(len(pred["row_id"])), videos=len(p.known))
    log.info("wrote %d file(s) from %d template(s) under %s (%d rows, %d filled from a neighbouring frame)",
             len(summary["files"]), len(templates), out, summary["lines"], summary["filled_from_neighbour"])
    return summary
