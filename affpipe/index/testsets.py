"""Test-set lists of the Aff-Wild2 releases: which videos are test, and which rows a submission has.

The releases name their test videos in small text files (see README "On the real Aff-Wild2"):

- ABAW1-2 (sent to the teams): ``va_test_set.txt``, ``expression_test_set.txt``,
  ``aus_test_set.txt`` — one video name per line.
- ABAW3+: ``names_of_videos_in_each_test_set/<Challenge>_test_set_release.txt`` — one video name
  per line, sometimes in a ``TestSet/`` folder beside (or inside) the challenge folders.
- ABAW3-4 MTL: ``MTL_Challenge_test_set_release.txt`` — a header line, then bare
  ``video/00001.jpg`` rows, only frames with a crop (gaps between frame numbers).
- ABAW5+: ``CVPR_<n>th_ABAW_<VA|Expr|AU>_test_set_<sample|example>.txt`` — the submission header
  (``image_location,valence,arousal`` ...), then one ``video/00001.jpg,`` row (trailing comma)
  per frame to predict, in the order the submission must follow.

A file is read as a *video list* or a *frame list* from its content, never from its name alone,
so renamed copies work too. Only the first column of a frame list is read.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from affpipe.index.annotations import refuse_utf16
from affpipe.io import clip, is_safe_name, safe_name
from affpipe.labels import AU_NAMES, EXPR_CLASSES, MAX_FRAME, VA_NAMES

log = logging.getLogger(__name__)

# va_test_set.txt, *_test_set_release.txt, *_test_set_sample.txt, *_test_set_example.txt
TEST_LIST_NAME = re.compile(r"(?i).*test_?set.*\.txt")
_IMAGE = re.compile(r"(?i)(?P<video>[^/\\]+)/(?P<frame>\d+)\.jpg")
_NEWLINE = re.compile(r"\r\n|\r|\n")
_PATH_HEADERS = {"image_location", "image", "image_path", "path", "location", "frame", "file", "filename"}
_TASK_WORDS = (("mtl", "mtl"), ("valence", "va"), ("va", "va"), ("expr", "expr"), ("expression", "expr"),
               ("action_unit", "au"), ("aus", "au"), ("au", "au"))


@dataclass(frozen=True)
class TestList:
    """One parsed test-set list."""

    path: Path
    kind: str  # "videos" | "frames"
    task: str | None  # "va" | "expr" | "au" | "mtl" | None (unknown)
    header: str | None  # frame lists: the header line as written (None: the file has none)
    videos: tuple[str, ...]  # unique, in order of first appearance
    images: tuple[str, ...]  # frame lists: the first field of each row, as written (stripped)
    row_video: tuple[str, ...]  # frame lists: the video of each row
    frames: np.ndarray  # frame lists: int64 frame number of each row
    lines: np.ndarray  # frame lists: the file line number of each row
    newline: str  # the file's line terminator ("\r\n" or "\n"), for writing it back alike

    @property
    def of_frames(self) -> bool:
        """A list of frames (one row per frame to predict) rather than of videos."""
        return self.kind == "frames"

    def describe(self) -> dict:
        """JSON-able description for ``index.json``."""
        return {"path": str(self.path), "kind": self.kind, "task": self.task, "videos": len(self.videos),
                "rows": len(self.images) if self.kind == "frames" else None}


def is_test_list_name(name: str) -> bool:
    """Whether a file name looks like one of the releases' test-set lists."""
    return bool(TEST_LIST_NAME.fullmatch(name))


def _task_of(path: Path, header_fields: list[str]) -> str | None:
    names = {f.strip().lower() for f in header_fields}
    if {"expression", "aus"} <= names or {"expression", "au1"} <= names:
        return "mtl"
    if names & {n.lower() for n in VA_NAMES}:
        return "va"
    if names & {n.lower() for n in EXPR_CLASSES}:
        return "expr"
    if any(re.fullmatch(r"au\d+", n) for n in names):
        return "au"
    words = re.split(r"[^a-z]+", path.name.lower())
    stem = path.name.lower()
    for word, task in _TASK_WORDS:
        if word in words or (len(word) > 3 and word in stem):
            return task
    return None


_KNOWN_COLUMNS = {n.lower() for n in (*VA_NAMES, *EXPR_CLASSES, *AU_NAMES, "expression", "aus", "au20")}


def _is_header(fields: list[str]) -> bool:
    first = fields[0].strip()
    if _IMAGE.fullmatch(first):
        return False
    names = {f.strip().lower() for f in fields}
    return first.lower() in _PATH_HEADERS or bool(names & _KNOWN_COLUMNS)


def read_test_list(path: Path) -> TestList:
    """Parse a test-set list (either shape); ``ValueError`` naming ``file:line`` on a bad row."""
    path = Path(path)
    data = path.read_bytes()
    refuse_utf16(data, path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    newline = "\r\n" if "\r\n" in text else "\n"
    raw = _NEWLINE.split(text)
    rows = [(i + 1, line) for i, line in enumerate(raw) if line.strip()]
    if not rows:
        raise ValueError(f"{path}: empty test-set list")
    first_no, first = rows[0]
    fields = first.split(",")
    header = None
    if _is_header(fields):
        header, rows = first, rows[1:]  # kept as written: a submission repeats it exactly
        kind = "frames"
    else:
        kind = "frames" if _IMAGE.fullmatch(fields[0].strip()) else "videos"
    task = _task_of(path, header.split(",") if header else [])
    if kind == "videos":
        videos = []
        for no, line in rows:
            name = line.strip().rstrip(",").strip()
            if not name or "," in name or not is_safe_name(name):
                raise ValueError(f"{path}:{no}: not a video name: {clip(line.strip())}")
            videos.append(name)
        uniq = tuple(dict.fromkeys(videos))
        return TestList(path, kind, task, None, uniq, (), (), np.zeros(0, np.int64), np.zeros(0, np.int64), newline)
    images, row_video, frames, lines = [], [], [], []
    for no, line in rows:
        cell = line.split(",", 1)[0].strip()
        m = _IMAGE.fullmatch(cell)
        if m is None:
            raise ValueError(f"{path}:{no}: expected <video>/<frame>.jpg in the first column, got {clip(cell)}")
        safe_name(m.group("video"), f"{path}:{no}")  # names from data become output file names
        if len(m.group("frame")) > len(str(MAX_FRAME)) or int(m.group("frame")) > MAX_FRAME:
            raise ValueError(f"{path}:{no}: frame number {clip(m.group('frame'), 30)} is beyond {MAX_FRAME:,}")
        images.append(cell)
        row_video.append(m.group("video"))
        frames.append(int(m.group("frame")))
        lines.append(no)
    return TestList(path, kind, task, header, tuple(dict.fromkeys(row_video)), tuple(images), tuple(row_video),
                    np.array(frames, np.int64), np.array(lines, np.int64), newline)


@dataclass(frozen=True)
class TestRule:
    """Which videos are ``test``: those the lists name, and those with crops and no annotation in
    any task (per-video files or MTL files), listed or not — an unlabelled video is never train."""

    lists: tuple[TestList, ...] = ()
    mtl_videos: frozenset[str] = frozenset()  # videos the MTL annotation files label

    def resolve(self, annotated: set[str], with_images: set[str]) -> tuple[set[str], dict]:
        """The test videos among ``annotated`` | ``with_images``, and a report for ``index.json``."""
        annotated = set(annotated) | set(self.mtl_videos)
        known = annotated | set(with_images)
        unlabelled = set(with_images) - annotated
        if self.lists:
            named = set().union(*(t.videos for t in self.lists))
            test = (named & known) | unlabelled
            missing = sorted(named - known)  # named, but neither crops nor annotations here
            unlisted = sorted(unlabelled - named)  # test too, but no list asks for them
        else:
            test, missing, unlisted = unlabelled, [], []
        moved = sorted(test & annotated)
        if moved:
            log.warning("%d annotated video(s) are test because a test list names them (their labels are "
                        "kept in the table but never reach a shard): %s", len(moved), ", ".join(moved[:10]))
        report = {
            "rule": "test lists + crops without annotation" if self.lists else "crops and no annotation (no test list found)",
            "lists": [t.describe() for t in self.lists],
            "videos": len(test),
            "annotated_videos_made_test": moved,
            "listed_videos_not_found": missing,
            "unlisted_videos_without_annotation": unlisted,
        }
        return test, report


def load_test_lists(paths: list[Path] | tuple[Path, ...], *, strict: bool = True) -> tuple[tuple[TestList, ...], list[dict]]:
    """Parse every list once (the same file found twice counts once).

    ``strict=False`` (files found by their name in the tree): a file that does not read as a list
    is returned as an unused entry with the reason, not an error; a list given by the user
    (``--test-list``) must read.
    """
    seen: dict[Path, TestList] = {}
    bad: list[dict] = []
    for p in paths:
        key = Path(p).resolve()
        if key in seen:
            continue
        try:
            seen[key] = read_test_list(key)
        except ValueError as exc:
            if strict:
                raise
            log.warning("not a test-set list: %s", exc)
            bad.append({"path": str(key), "reason": f"named like a test-set list but not one: {exc}", "txt_files": 1})
    return tuple(seen.values()), bad
