"""Submission files that follow an official test-set file row for row (``predict --template``).

A template is any file :func:`affpipe.index.testsets.read_test_list` reads:

- a frame list (the ABAW5+ ``*_test_set_sample.txt`` / ``*_example.txt``, the ABAW3-4
  ``MTL_Challenge_test_set_release.txt``): the output keeps the template's header line, its rows'
  image paths as written and their order, and its line ending; each row gets the values of its
  frame. A frame without a crop takes the nearest frame's prediction (the earlier one on a tie).
- a video list (``names_of_videos_in_each_test_set/*.txt``, ABAW1-2 ``*_test_set.txt``): the
  output covers exactly those videos, in the list's order, frames 1..the last one indexed.

Columns follow the header by name: an EXPR header of 7 classes (ABAW1-2) gets the most likely of
those 7; an AU header maps each AU by name, and an AU no model predicts (ABAW1's AU20) is written
as 0 and reported. A row whose video is not in the predicted split is an error naming the file
and line, unless ``fill_missing`` is set: then it gets the default prediction (valence 0, arousal
0, Neutral, no AU) and is counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from affpipe.index.testsets import TestList, read_test_list
from affpipe.io import atomic_write_text, confined_path, safe_name
from affpipe.labels import AU_NAMES, EXPR_CLASSES, VA_NAMES
from affpipe.train.predict import _fill_nearest  # one owner of the nearest-frame rule

log = logging.getLogger(__name__)

DIRS = {"va": "VA", "expr": "EXPR", "au": "AU"}
HEADERS = {"va": "valence,arousal", "expr": ",".join(EXPR_CLASSES), "au": ",".join(AU_NAMES)}
# per-video headers of each edition's submission (ABAW1: 7 classes, 8 AUs; ABAW2: 7 classes)
EDITION_HEADERS = {
    "abaw1": {**HEADERS, "expr": ",".join(EXPR_CLASSES[:7]), "au": "AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25"},
    "abaw2": {**HEADERS, "expr": ",".join(EXPR_CLASSES[:7])},
    "abaw3": HEADERS,
}
MTL_HEADER = "image,valence,arousal,expression,aus"


@dataclass
class Predictions:
    """The model's outputs and where each video's frames are among them."""

    pred: dict[str, np.ndarray]  # MetricAccumulator.predictions()
    heads: tuple[str, ...]
    known: dict[str, tuple[np.ndarray, np.ndarray]]  # video -> (sorted frames with a prediction, positions)
    last: dict[str, int]  # video -> largest frame the table holds
    crops: dict[str, np.ndarray]  # video -> frames with an image


@dataclass
class _Tally:
    rows: int = 0
    filled_from_neighbour: int = 0
    past_last_frame: int = 0
    missing: list[str] = field(default_factory=list)  # "file:line video" of rows given the default
    unpredicted_columns: set[str] = field(default_factory=set)


def index_predictions(pred: dict[str, np.ndarray], heads: tuple[str, ...], video: np.ndarray, frame: np.ndarray,
                      pos: np.ndarray, has_image: np.ndarray) -> Predictions:
    """Group a split's rows (sorted by video, frame; ``pos`` -1 = no prediction) by video."""
    known, last, crops = {}, {}, {}
    bounds = np.flatnonzero(np.r_[True, video[1:] != video[:-1], True]) if len(video) else np.zeros(1, np.int64)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        name, f, p = str(video[start]), frame[start:stop], pos[start:stop]
        known[name] = (f[p >= 0], p[p >= 0])
        last[name] = int(f.max())
        crops[name] = f[has_image[start:stop]]
    return Predictions(pred, tuple(heads), known, last, crops)


def _runs(videos: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(video, start, stop) of each run of equal consecutive videos (a template lists a video's
    rows together; a video split over several runs just gives several runs)."""
    v = np.array(videos, dtype=object)
    bounds = np.flatnonzero(np.r_[True, v[1:] != v[:-1], True]) if len(v) else np.zeros(1, np.int64)
    return [(str(v[a]), int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _lookup(p: Predictions, tl: TestList, fill_missing: bool, tally: _Tally) -> np.ndarray:
    """Position in ``p.pred`` for every template row (-1: default prediction)."""
    idx = np.full(len(tl.row_video), -1, np.int64)
    for name, a, b in _runs(tl.row_video):
        kf, kp = p.known.get(name, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        if not len(kf):
            where = f"{tl.path}:{int(tl.lines[a])}" if len(tl.lines) else str(tl.path)
            if not fill_missing:
                why = "has no frame with a prediction" if name in p.known else "is not in the predicted split"
                raise ValueError(f"{where}: video {name!r} {why}; pass --fill-missing to write the default "
                                 "prediction for its rows")
            tally.missing += [f"{where} {name}"] * (b - a)
            continue
        frames = tl.frames[a:b]
        near = _fill_nearest(frames, kf)
        idx[a:b] = kp[near]
        tally.filled_from_neighbour += int((kf[near] != frames).sum())
        tally.past_last_frame += int((frames > p.last.get(name, 0)).sum())
    tally.rows += len(idx)
    return idx


def _take(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``arr[idx]`` with -1 (no prediction) read as row 0, also when ``arr`` is empty."""
    if not len(arr):
        return np.zeros((len(idx), *arr.shape[1:]), arr.dtype)
    return arr[np.maximum(idx, 0)]


def _va(p: Predictions, idx: np.ndarray, names: list[str]) -> list[str]:
    order = [VA_NAMES.index(n) for n in names] if sorted(names) == sorted(VA_NAMES) else [0, 1]
    va = np.where(idx[:, None] >= 0, _take(p.pred["va"], idx), 0.0)[:, order]
    return [f"{a:.6f},{b:.6f}" for a, b in va]


def _expr(p: Predictions, idx: np.ndarray, names: list[str]) -> list[str]:
    lower = [c.lower() for c in EXPR_CLASSES]
    classes = [lower.index(n.lower()) for n in names if n.lower() in lower]
    if classes and len(classes) == len(names):  # the header lists the classes: the most likely of those
        e = np.argmax(_take(p.pred["expr_prob"], idx)[:, classes], axis=1)
    else:
        e = _take(p.pred["expr"], idx)
    return [str(int(x)) for x in np.where(idx >= 0, e, 0)]


def _au(p: Predictions, idx: np.ndarray, names: list[str], tally: _Tally) -> list[str]:
    lower = [a.lower() for a in AU_NAMES]
    cols = [lower.index(n.lower()) if n.lower() in lower else -1 for n in names]
    if not any(c >= 0 for c in cols):  # no AU names in the header (MTL "aus"): the 12 in order
        cols = list(range(len(AU_NAMES)))
    tally.unpredicted_columns |= {n for n, c in zip(names, cols, strict=False) if c < 0}
    au = np.where(idx[:, None] >= 0, _take(p.pred["au"], idx), 0).astype(np.int64)
    out = np.zeros((len(idx), len(cols)), np.int64)
    for j, c in enumerate(cols):
        if c >= 0:
            out[:, j] = au[:, c]
    return [",".join(map(str, row)) for row in out.tolist()]


def _values(task: str, p: Predictions, idx: np.ndarray, names: list[str], tally: _Tally) -> list[str]:
    if task == "va":
        return _va(p, idx, names)
    if task == "expr":
        return _expr(p, idx, names)
    if task == "au":
        return _au(p, idx, names, tally)
    parts = [_va(p, idx, []), _expr(p, idx, []), _au(p, idx, [], tally)]
    return [",".join(x) for x in zip(*parts, strict=True)]


def _task(tl: TestList, fmt: str, heads: tuple[str, ...]) -> str:
    if fmt == "mtl":
        return "mtl"
    task = tl.task if tl.task != "mtl" else None
    if task is None:
        if len(heads) != 1:
            raise ValueError(f"{tl.path}: cannot tell the task from its name or header; rename it "
                             "(VA/Expr/AU in the name) or use a single-task model")
        task = heads[0]
    if task not in heads:
        raise ValueError(f"{tl.path}: a {task.upper()} template, but the model has heads {list(heads)}")
    return task


def _frames_of_videos(p: Predictions, tl: TestList, fmt: str, fill_missing: bool, tally: _Tally) -> TestList:
    """A video list as the frame list it stands for (frames 1..last; MTL: the frames with a crop)."""
    images, row_video, frames = [], [], []
    for name in tl.videos:
        if name not in p.known or not len(p.known[name][0]):
            if not fill_missing:
                raise ValueError(f"{tl.path}: video {name!r} is not in the predicted split (or has no crop); "
                                 "pass --fill-missing to skip it")
            tally.missing.append(f"{tl.path} {name} (skipped: no frames known)")
            continue
        f = p.crops[name] if fmt == "mtl" else np.arange(1, p.last[name] + 1)
        images += [f"{name}/{int(x):05d}.jpg" for x in f]
        row_video += [name] * len(f)
        frames.append(f)
    fr = np.concatenate(frames).astype(np.int64) if frames else np.zeros(0, np.int64)
    return TestList(tl.path, "frames", tl.task, None, tuple(dict.fromkeys(row_video)), tuple(images),
                    tuple(row_video), fr, np.zeros(len(fr), np.int64), tl.newline)


def _write_rows(path: Path, header: str, images: tuple[str, ...], values: list[str], nl: str) -> None:
    body = "".join(f"{img},{v}{nl}" for img, v in zip(images, values, strict=True))
    atomic_write_text(path, header + nl + body)


def _per_video(p: Predictions, tl: TestList, task_list: list[str], out: Path, tally: _Tally,
               headers: dict[str, str] = HEADERS) -> list[Path]:
    files = []
    for name, a, b in _runs(tl.row_video):
        sub = TestList(tl.path, "frames", None, None, (name,), (), (name,) * (b - a), tl.frames[a:b],
                       tl.lines[a:b], tl.newline)
        idx = _lookup(p, sub, True, tally)
        for task in task_list:
            # The name comes from a template (data): it becomes a path only if it stays under OUT.
            path = confined_path(out, f"{DIRS[task]}/{safe_name(name, f'{tl.path}: video')}.txt", f"predict -o {out}")
            path.parent.mkdir(parents=True, exist_ok=True)
            values = _values(task, p, idx, headers[task].split(","), tally)
            atomic_write_text(path, headers[task] + tl.newline + "".join(v + tl.newline for v in values))
            files.append(path)
    return files


def write_from_templates(templates: tuple[Path, ...], fmt: str, p: Predictions, out: Path, *,
                         fill_missing: bool = False, edition: str = "abaw3") -> dict:
    """Write one output per template under ``out``; returns what was written and filled.

    No template with ``abaw-per-video``: every video of the split, with ``edition``'s headers.
    """
    if edition not in EDITION_HEADERS:
        raise ValueError(f"edition must be one of {tuple(EDITION_HEADERS)}, got {edition!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tally, files, targets = _Tally(), [], {}
    lists = [read_test_list(Path(t)) for t in templates]
    if not lists and fmt == "abaw-per-video":
        lists = [TestList(out, "videos", None, None, tuple(sorted(p.known)), (), (), np.zeros(0, np.int64),
                          np.zeros(0, np.int64), "\n")]
    for path, tl in zip(templates or [out], lists, strict=True):
        if tl.kind == "videos":
            tl = _frames_of_videos(p, tl, fmt, fill_missing, tally)
        if fmt == "abaw-per-video":
            tasks = [tl.task] if tl.task in p.heads else list(p.heads)
            files += _per_video(p, tl, tasks, out, tally, EDITION_HEADERS[edition])
            continue
        task = _task(tl, fmt, p.heads)
        if fmt == "mtl" and set(p.heads) != {"va", "expr", "au"}:
            raise ValueError(f"--format mtl needs a multi-task model; this one has heads {list(p.heads)}")
        name = "MTL.txt" if task == "mtl" else f"{DIRS[task]}.txt"
        if name in targets:
            raise ValueError(f"{path} and {targets[name]} both write {out / name}")
        targets[name] = path
        header = tl.header if tl.header is not None else (
            MTL_HEADER if task == "mtl" else f"image_location,{HEADERS[task]}")
        idx = _lookup(p, tl, fill_missing, tally)
        names = [h.strip() for h in header.split(",")[1:] if h.strip()]  # a trailing comma names nothing
        values = _values(task, p, idx, names, tally)
        _write_rows(out / name, header, tl.images, values, tl.newline)
        files.append(out / name)
    if tally.unpredicted_columns:
        log.warning("no model output for column(s) %s: written as 0", sorted(tally.unpredicted_columns))
    if tally.missing:
        log.warning("%d template row(s) got the default prediction (--fill-missing), first: %s",
                    len(tally.missing), tally.missing[0])
    return {"format": fmt, "templates": [str(t) for t in templates], "files": [str(f) for f in files],
            "lines": tally.rows, "filled_from_neighbour": tally.filled_from_neighbour,
            "past_last_frame": tally.past_last_frame, "filled_missing": len(tally.missing),
            "unpredicted_columns": sorted(tally.unpredicted_columns)}
