"""What ``affpipe crop`` reads: video files and folders of photos, their names and frames.

A *source* is one "video" of the output tree: a video file (frames in decode order, each with its
own timestamp, so variable frame rate is kept), or a folder of photos (frames in sorted file
name order, time null). Every source is checked before anything is written (:func:`probe`), so a
garbage, empty or audio-only file is one error naming it, not a half-written tree.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from affpipe.io import is_safe_name, sha256_file

log = logging.getLogger(__name__)

VIDEO_EXTS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv",
                        ".flv", ".3gp", ".ts", ".mts", ".m2ts", ".ogv"})
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
_MAX_NAME = 200  # bytes of a mapped name, leaving room for "_right" and a hash suffix


@dataclass(frozen=True)
class Source:
    """One output video: a video file, or a folder of photos (``files`` in frame order)."""

    name: str
    path: Path
    kind: str  # "video" | "photos"
    files: tuple[Path, ...]

    def fingerprint(self) -> dict:
        """Size and sha256 of what the source reads (a photo folder: of its files, in order)."""
        if self.kind == "video":
            return {"kind": self.kind, "size": self.path.stat().st_size, "sha256": sha256_file(self.path)}
        h = hashlib.sha256()
        size = 0
        for f in self.files:
            n = f.stat().st_size
            size += n
            h.update(f"{os.fsencode(f.name).hex()}:{n}:{sha256_file(f)};".encode())
        return {"kind": self.kind, "files": len(self.files), "size": size, "sha256": h.hexdigest()}


def video_name(raw: str) -> str:
    """The output name of a source called ``raw`` (a file stem or folder name).

    A plain name (:func:`affpipe.io.is_safe_name`, not starting with ``.``, which ``index``
    skips) is kept as it is; any other is mapped deterministically: separators, NUL and bytes
    that are not UTF-8 become ``_``, a leading dot ``_``, the length is cut, and a hash of the raw
    name is appended, so two raw names never map to one.
    """
    if is_safe_name(raw) and not raw.startswith(".") and len(raw.encode()) <= _MAX_NAME:
        return raw
    raw_bytes = os.fsencode(raw)
    text = raw_bytes.decode("utf-8", "replace").replace("\ufffd", "_")
    text = re.sub(r"[/\\\x00]", "_", text)
    text = re.sub(r"^\.", "_", text) or "_"
    while len(text.encode()) > _MAX_NAME:
        text = text[:-1]
    return f"{text}-{hashlib.sha256(raw_bytes).hexdigest()[:8]}"


def _ext(p: Path) -> str:
    return p.suffix.lower()


def find_sources(paths: tuple[Path, ...]) -> tuple[list[Source], list[str]]:
    """The sources named by ``paths`` (files: a video each; folders: each video file in them,
    plus their photos as one source named after the folder), sorted by name, and the files in
    those folders that are neither (reported, not read)."""
    sources: list[Source] = []
    ignored: list[str] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        if p.is_file():
            sources.append(Source(video_name(p.stem), p, "video", (p,)))
            continue
        if not p.is_dir():
            raise ValueError(f"{p}: not a file or a folder")
        entries = sorted((e for e in p.iterdir() if not e.name.startswith(".")), key=lambda e: os.fsencode(e.name))
        photos = tuple(e for e in entries if e.is_file() and _ext(e) in IMAGE_EXTS)
        videos = [e for e in entries if e.is_file() and _ext(e) in VIDEO_EXTS]
        ignored += [str(e) for e in entries if e.is_file() and e not in photos and e not in videos]
        sources += [Source(video_name(v.stem), v, "video", (v,)) for v in videos]
        if photos:
            sources.append(Source(video_name(p.resolve().name), p, "photos", photos))
        if not photos and not videos:
            raise ValueError(f"{p}: holds no video files ({', '.join(sorted(VIDEO_EXTS))}) and no photos "
                             f"({', '.join(sorted(IMAGE_EXTS))})")
    seen: dict[str, Path] = {}
    for s in sources:
        if s.name in seen:
            raise ValueError(f"{s.path} and {seen[s.name]}: both would be video {s.name!r} in the tree; "
                             "rename one or crop them into separate folders")
        seen[s.name] = s.path
    return sorted(sources, key=lambda s: s.name), ignored


def _open_video(path: Path) -> cv2.VideoCapture:
    try:
        name = os.fsdecode(path)
        name.encode("utf-8")
    except UnicodeError:
        raise ValueError(f"{path}: the file name is not valid UTF-8, which OpenCV cannot open; rename it") from None
    cap = cv2.VideoCapture(name, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        raise ValueError(f"{path}: cannot be read as a video (not a video file, damaged, or a codec "
                         "OpenCV's FFmpeg lacks)")
    # Phone videos store their rotation as metadata: honour it, so faces are upright for the detector.
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
    return cap


def probe(source: Source) -> None:
    """Refuse a source that cannot give one frame (empty, garbage, audio-only), naming the file."""
    if source.kind == "photos":
        return  # an unreadable photo is one bad frame, counted; the folder has others
    path = source.path
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes); not a video")
    cap = _open_video(path)
    try:
        ok, frame = cap.read()
    finally:
        cap.release()
    if not ok or frame is None:
        raise ValueError(f"{path}: holds no video frame OpenCV can decode (audio only, or not a video)")


@dataclass
class FrameInfo:
    """What reading a source found besides its frames."""

    expected: int | None = None  # frames the container header announces
    decoded: int = 0
    bad: int = 0  # photos that could not be decoded (a frame number with no image)
    rotation: int = 0  # degrees of rotation metadata honoured


def read_frames(source: Source, info: FrameInfo) -> Iterator[tuple[int, float | None, np.ndarray | None]]:
    """``(frame number from 1, time in seconds or None, BGR image or None)`` of every frame."""
    if source.kind == "photos":
        info.expected = len(source.files)
        for i, f in enumerate(source.files, 1):
            img = None
            try:
                img = cv2.imdecode(np.fromfile(f, np.uint8), cv2.IMREAD_COLOR)  # applies EXIF orientation
            except (OSError, cv2.error):
                img = None
            if img is None:
                info.bad += 1
                log.warning("%s: not a readable image; frame %d has no face", f, i)
            info.decoded += 1
            yield i, None, img
        return
    cap = _open_video(source.path)
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        info.expected = n if n > 0 else None
        info.rotation = int(cap.get(cv2.CAP_PROP_ORIENTATION_META) or 0)
        i = 0
        while True:
            ok, frame = cap.read()  # decodes with the GIL released
            if not ok or frame is None:
                break
            i += 1
            info.decoded = i
            yield i, cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0, frame
    finally:
        cap.release()
