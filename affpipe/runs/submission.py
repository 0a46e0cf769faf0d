"""Submission files in the ABAW formats: the one writer of prediction files (``affpipe predict``).

Formats:

- ``abaw-per-video``: one ``<video>.txt`` per video and task under ``OUT/VA``, ``OUT/EXPR``,
  ``OUT/AU`` (ABAW1-4): the edition's header, then one line per frame of the video.
- ``abaw-single``: one file per task (ABAW5+), ``OUT/VA.txt`` etc., header
  ``image_location,<columns>``, one row ``video/00001.jpg,...`` per frame.
- ``mtl``: ``OUT/MTL.txt``, header ``image,valence,arousal,expression,aus``, one row
  ``video/00001.jpg,v,a,e,au1,...,au12`` per image.

Rows: without a template, every frame 1..last of every video of the predicted split (MTL: the
frames with a crop); with a template (any file :func:`affpipe.index.testsets.read_test_list`
reads), the template's rows:

- a frame list (the ABAW5+ ``*_test_set_sample.txt`` / ``*_example.txt``, the ABAW3-4
  ``MTL_Challenge_test_set_release.txt``): the output keeps the template's header line, its rows'
  image paths as written and their order, and its line ending.
- a video list (``names_of_videos_in_each_test_set/*.txt``, ABAW1-2 ``*_test_set.txt``): the
  output covers exactly those videos, in the list's order, frames 1..the last one indexed.

A frame without a prediction (no crop, or not in the data) takes the nearest frame's prediction
(the earlier one on a tie), as ABAW participants did. Columns follow the header by name (any
case) for every task, never by position, and the headers of each edition come from one table
(``affpipe.labels.EDITION_COLUMNS``): a VA header gets one field per name (``Arousal,Valence``:
arousal first); an EXPR header of 7 classes (ABAW1-2), in any order, gets the most likely of
those, as its position in the header; an AU header maps each AU by name, and an AU no model
predicts (ABAW1's AU20) is written as 0 and reported; an MTL header maps ``valence``,
``arousal``, ``expression``, ``aus`` (12 fields) and AU names. Any other name is refused, naming
it and the template, so a row never has another field count than its header. A template row whose video is
not in the predicted split is an error naming the file and line, unless ``fill_missing``: then it
gets the default prediction (valence 0, arousal 0, Neutral, no AU) and is counted. A template of
another task or format than asked for is one error naming the template and what it is.

Every file is written atomically through the output folder's ``Claim`` (``affpipe.outdir``):
only names ``predict`` writes, never through a symlink, never outside ``-o``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from affpipe.index.testsets import TestList, read_test_list
from affpipe.io import atomic_write_text, safe_name
from affpipe.labels import AU_NAMES, EDITIONS, EXPR_CLASSES, MTL_HEADER, VA_NAMES, edition_header
from affpipe.outdir import Claim, Owner

log = logging.getLogger(__name__)

FORMATS = ("abaw-per-video", "abaw-single", "mtl")
DIRS = {"va": "VA", "expr": "EXPR", "au": "AU"}
PROBABILITIES = "probabilities"  # predict's sidecar folder: the scores behind the labels, never sent
PREDICT_OWNER = Owner("predict", ("VA/*.txt", "EXPR/*.txt", "AU/*.txt", "VA.txt", "EXPR.txt", "AU.txt", "MTL.txt",
                                  f"{PROBABILITIES}/*.csv"))


def _fill_nearest(frames: np.ndarray, known_frames: np.ndarray) -> np.ndarray:
    """For each of ``frames``, the index into sorted ``known_frames`` of the nearest one (earlier on a tie)."""
    right = np.clip(np.searchsorted(known_frames, frames), 0, len(known_frames) - 1)
    left = np.clip(right - 1, 0, len(known_frames) - 1)
    use_left = np.abs(frames - known_frames[left]) <= np.abs(known_frames[right] - frames)
    return np.where(use_left, left, right)


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
            where = f"{tl.path}:{int(tl.lines[a])}" if len(tl.lines) and tl.lines[a] > 0 else str(tl.path)
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


class HeaderError(ValueError):
    """A template header naming columns the model cannot fill (the caller adds the file)."""


def _refuse(task: str, unknown: list[str], expected: tuple[str, ...] | list[str]) -> None:
    if unknown:
        raise HeaderError(f"header column(s) {unknown} are not {_TASK_WORDS[task]} outputs of the model (it "
                          f"writes {list(expected)}, matched by name, any case); fix the header or the template")


def _va_fields(p: Predictions, idx: np.ndarray, names: list[str]) -> np.ndarray:
    """One column per header name, by name (``Arousal,Valence`` gets arousal first)."""
    lower = [n.lower() for n in VA_NAMES]
    names = names or list(VA_NAMES)
    _refuse("va", [n for n in names if n.lower() not in lower], VA_NAMES)
    va = np.where(idx[:, None] >= 0, _take(p.pred["va"], idx), 0.0)
    return np.char.mod("%.6f", va[:, [lower.index(n.lower()) for n in names]])


def _expr_field(p: Predictions, idx: np.ndarray, names: list[str]) -> np.ndarray:
    """One column: the class index. A header listing classes (the ABAW files: one name per class,
    one value per row) gets the most likely of those, as its position among them; a header of one
    name that is no class (``expression``) gets the 8-class index; any other name is refused."""
    lower = [c.lower() for c in EXPR_CLASSES]
    known = [n for n in names if n.lower() in lower]
    if known:
        _refuse("expr", [n for n in names if n.lower() not in lower], EXPR_CLASSES)
        if len({n.lower() for n in names}) != len(names):
            raise HeaderError(f"header names a class twice ({names}); each class once")
        e = np.argmax(_take(p.pred["expr_prob"], idx)[:, [lower.index(n.lower()) for n in names]], axis=1)
    elif len(names) <= 1:
        e = _take(p.pred["expr"], idx)
    else:
        _refuse("expr", names, EXPR_CLASSES)
    return np.where(idx >= 0, e, 0).astype(np.int64).astype(str)


def _au_fields(p: Predictions, idx: np.ndarray, names: list[str], tally: _Tally) -> np.ndarray:
    """One column per header name, by name; an AU the model has no output for (ABAW1's AU20) is
    written as 0 and reported; a header naming no AU at all is refused (no header: the 12 in order)."""
    lower = [a.lower() for a in AU_NAMES]
    names = names or list(AU_NAMES)
    cols = [lower.index(n.lower()) if n.lower() in lower else -1 for n in names]
    if not any(c >= 0 for c in cols):
        _refuse("au", names, AU_NAMES)
    tally.unpredicted_columns |= {n for n, c in zip(names, cols, strict=True) if c < 0}
    au = np.where(idx[:, None] >= 0, _take(p.pred["au"], idx), 0).astype(np.int64)
    out = np.zeros((len(idx), len(cols)), np.int64)
    for j, c in enumerate(cols):
        if c >= 0:
            out[:, j] = au[:, c]
    return out.astype(str)


_MTL_NAMES = [n.lower() for n in MTL_HEADER.split(",")[1:]]  # valence, arousal, expression, aus


def _mtl_fields(p: Predictions, idx: np.ndarray, names: list[str], tally: _Tally) -> list[np.ndarray]:
    """The MTL columns by name: ``valence``, ``arousal``, ``expression`` (the 8-class index),
    ``aus`` (the 12 AUs, as the release writes them) or single AU names; anything else refused."""
    lower = [n.lower() for n in (names or _MTL_NAMES)]
    au_lower = [a.lower() for a in AU_NAMES]
    _refuse("mtl", [n for n, k in zip(names, lower, strict=False)
                    if k not in _MTL_NAMES and k not in au_lower], [*_MTL_NAMES, *AU_NAMES])
    cols = []
    for k in lower:
        if k in ("valence", "arousal"):
            cols.append(_va_fields(p, idx, [k]))
        elif k == "expression":
            cols.append(_expr_field(p, idx, [])[:, None])
        else:
            cols.append(_au_fields(p, idx, [] if k == "aus" else [k], tally))
    return cols


def _values(task: str, p: Predictions, idx: np.ndarray, names: list[str], tally: _Tally) -> list[str]:
    """Each row's fields after the image, following ``names`` (the template header's columns)."""
    if task == "va":
        cols = [_va_fields(p, idx, names)]
    elif task == "expr":
        cols = [_expr_field(p, idx, names)[:, None]]
    elif task == "au":
        cols = [_au_fields(p, idx, names, tally)]
    else:
        cols = _mtl_fields(p, idx, names, tally)
    table = np.concatenate(cols, axis=1) if cols else np.zeros((len(idx), 0), str)
    return [",".join(row) for row in table.tolist()]


_TASK_WORDS = {"va": "VA", "expr": "EXPR", "au": "AU", "mtl": "MTL"}


def _what(tl: TestList) -> str:
    """How a template reads, for messages: ``an AU frame list (header 'image_location,AU1,...')``."""
    task = _TASK_WORDS.get(tl.task or "", "")
    head = f" (header {tl.header!r})" if tl.header else ""
    article = "an" if task in ("AU", "MTL", "EXPR") else "a"
    return f"{article} {task} {'frame' if tl.of_frames else 'video'} list{head}".replace("  ", " ")


def _task(tl: TestList, fmt: str, heads: tuple[str, ...]) -> str:
    """The task a template stands for under ``fmt``; one error naming it when they do not fit."""
    if fmt == "mtl":
        if tl.task not in (None, "mtl"):
            raise ValueError(f"{tl.path}: {_what(tl)}, not an MTL test-set file; --format mtl follows the MTL "
                             f"release (header {MTL_HEADER!r}); use --format abaw-single with this one")
        return "mtl"
    if tl.task == "mtl":
        raise ValueError(f"{tl.path}: {_what(tl)}, an MTL test-set file; use --format mtl with it")
    task = tl.task
    if task is None:
        if len(heads) != 1:
            raise ValueError(f"{tl.path}: cannot tell the task from its name or header; rename it "
                             "(VA/Expr/AU in the name) or use a single-task model")
        task = heads[0]
    if task not in heads:
        raise ValueError(f"{tl.path}: {_what(tl)}, but the model has heads {list(heads)}")
    return task


def _template_task(tl: TestList, fmt: str, heads: tuple[str, ...]) -> str | None:
    """``_task``; None for a per-video output of every head (a template that names no task)."""
    return _task(tl, fmt, heads) if fmt != "abaw-per-video" or tl.task is not None else None


def check_templates(templates: tuple[Path, ...], fmt: str, heads: tuple[str, ...]) -> list[TestList]:
    """Read every template and check it fits ``fmt`` and the model's heads (one error naming it)."""
    lists = [read_test_list(Path(t)) for t in templates]
    for tl in lists:
        _template_task(tl, fmt, heads)
    return lists


def _frames_of_videos(p: Predictions, tl: TestList, fmt: str, fill_missing: bool, tally: _Tally) -> TestList:
    """A video list as the frame list it stands for (frames 1..last; MTL: the frames with a crop)."""
    images, row_video, frames = [], [], []
    for name in tl.videos:
        if name not in p.last:
            if not fill_missing:
                raise ValueError(f"{tl.path}: video {name!r} is not in the predicted split; "
                                 "pass --fill-missing to skip it")
            tally.missing.append(f"{tl.path} {name} (skipped: not in the split)")
            continue
        f = p.crops[name] if fmt == "mtl" else np.arange(1, p.last[name] + 1)
        images += [f"{name}/{int(x):05d}.jpg" for x in f]
        row_video += [name] * len(f)
        frames.append(f)
    fr = np.concatenate(frames).astype(np.int64) if frames else np.zeros(0, np.int64)
    return TestList(tl.path, "frames", tl.task, None, tuple(dict.fromkeys(row_video)), tuple(images),
                    tuple(row_video), fr, np.zeros(len(fr), np.int64), tl.newline)


def _per_video(p: Predictions, tl: TestList, task_list: list[str], out: Claim, tally: _Tally,
               edition: str, fill_missing: bool) -> list[Path]:
    files = []
    for name, a, b in _runs(tl.row_video):
        sub = TestList(tl.path, "frames", None, None, (name,), (), (name,) * (b - a), tl.frames[a:b],
                       tl.lines[a:b], tl.newline)
        idx = _lookup(p, sub, fill_missing, tally)
        for task in task_list:
            # The name comes from data: it becomes a path only as a name predict writes under OUT.
            path = out.path(f"{DIRS[task]}/{safe_name(name, f'{tl.path}: video')}.txt")
            header = edition_header(task, edition)
            values = _values(task, p, idx, header.split(","), tally)
            atomic_write_text(path, header + tl.newline + "".join(v + tl.newline for v in values))
            files.append(path)
    return files


def write_submission(p: Predictions, out: Claim, fmt: str, *, templates: tuple[Path, ...] = (),
                     fill_missing: bool = False, edition: str = "abaw3") -> dict:
    """Write ``p`` in ``fmt`` into the claimed folder ``out``: one output per template, or (no
    template) every video of the split with ``edition``'s headers; returns what was written and filled."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if edition not in EDITIONS:
        raise ValueError(f"edition must be one of {EDITIONS}, got {edition!r}")
    tally, files, targets = _Tally(), [], {}
    lists = check_templates(templates, fmt, p.heads)
    implicit = not lists  # the split itself: a video without any prediction gets the default
    if implicit:  # one list of every video per output: all heads per video, one file per head, or MTL
        tasks = [None] if fmt == "abaw-per-video" else ["mtl"] if fmt == "mtl" else list(p.heads)
        lists = [TestList(Path("the split"), "videos", t, None, tuple(p.last), (), (), np.zeros(0, np.int64),
                          np.zeros(0, np.int64), "\n") for t in tasks]
    for tl in lists:
        task = _template_task(tl, fmt, p.heads)
        if tl.kind == "videos":
            tl = _frames_of_videos(p, tl, fmt, fill_missing, tally)
        if fmt == "abaw-per-video":
            files += _per_video(p, tl, [task] if task else list(p.heads), out, tally, edition, fill_missing or implicit)
            continue
        name = "MTL.txt" if task == "mtl" else f"{DIRS[task]}.txt"
        if name in targets:
            raise ValueError(f"{tl.path} and {targets[name]} both write {out.out / name}")
        targets[name] = tl.path
        header = tl.header if tl.header is not None else (
            MTL_HEADER if task == "mtl" else f"image_location,{edition_header(task, edition)}")
        idx = _lookup(p, tl, fill_missing or implicit, tally)
        names = [h.strip() for h in header.split(",")[1:] if h.strip()]  # a trailing comma names nothing
        try:
            values = _values(task, p, idx, names, tally)
        except HeaderError as exc:
            raise ValueError(f"{tl.path}: {_what(tl)}: {exc}") from None
        path = out.path(name)
        atomic_write_text(path, header + tl.newline + "".join(f"{img},{v}{tl.newline}"
                                                             for img, v in zip(tl.images, values, strict=True)))
        files.append(path)
    if tally.unpredicted_columns:
        log.warning("no model output for column(s) %s: written as 0", sorted(tally.unpredicted_columns))
    if tally.missing:
        log.warning("%d row(s) got the default prediction (no prediction for their video), first: %s",
                    len(tally.missing), tally.missing[0])
    return {"format": fmt, "edition": edition, "templates": [str(t) for t in templates],
            # rows per file without a template (each head's file has the same rows), else template rows
            "files": [str(f) for f in files], "lines": tally.rows // len(lists) if implicit else tally.rows, "filled_from_neighbour": tally.filled_from_neighbour,
            "past_last_frame": tally.past_last_frame, "filled_missing": len(tally.missing),
            "unpredicted_columns": sorted(tally.unpredicted_columns)}


def write_probabilities(p: Predictions, out: Claim) -> list[Path]:
    """``probabilities/<VA|EXPR|AU>.csv`` beside the official files (which stay labels only):
    one row per predicted frame, in (video, frame) order: ``video,frame`` then valence and
    arousal, the 8 class probabilities (softmax) or the 12 AU probabilities (sigmoid), as the
    model gave them, before any threshold or argmax."""
    columns = {"va": ("va", VA_NAMES), "expr": ("expr_prob", EXPR_CLASSES), "au": ("au_prob", AU_NAMES)}
    order = [(video, frames, pos) for video, (frames, pos) in sorted(p.known.items()) if len(pos)]
    files = []
    for task in p.heads:
        key, names = columns[task]
        values = p.pred[key]
        lines = [",".join(("video", "frame", *names))]
        for video, frames, pos in order:
            lines += [f"{video},{int(f)}," + ",".join(f"{x:.6g}" for x in row)
                      for f, row in zip(frames.tolist(), values[pos].tolist(), strict=True)]
        path = out.path(f"{PROBABILITIES}/{DIRS[task]}.csv")
        atomic_write_text(path, "\n".join(lines) + "\n")
        files.append(path)
    return files
