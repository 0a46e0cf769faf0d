"""Parse the s-Aff-Wild2 MTL files (``video/00001.jpg,V,A,EXPR,AU×12`` rows; duplicates occur)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from affpipe.index.annotations import (
    _NEWLINE,
    Header,
    _canonical,
    _check_values,
    _read_csv,
    _reason,
    refuse_utf16,
    split_lines,
)
from affpipe.io import clip, is_safe_name, safe_name
from affpipe.labels import AU_NAMES, EXPR_CLASSES, MAX_FRAME, NUM_AU, VA_NAMES

log = logging.getLogger(__name__)

# --- MTL (s-Aff-Wild2) ----------------------------------------------------------------------

MTL_COLUMNS = ("image", *VA_NAMES, "expression", *AU_NAMES)
_MTL_ALIASES = {"expr": "expression", "exp": "expression", "v": "valence", "a": "arousal"}
_MTL_PATH = re.compile(r"(.+)/(\d+)\.jpg", re.IGNORECASE | re.ASCII)
_VA_H = Header("va", VA_NAMES, (0, 1))
_EXPR_H = Header("expr", EXPR_CLASSES, tuple(range(len(EXPR_CLASSES))))
_AU_H = Header("au", AU_NAMES, tuple(range(NUM_AU)))


@dataclass
class MTLParsed:
    """Rows of the MTL files in file order (train file first), duplicates still in."""

    video: list[str]
    frame: np.ndarray  # int32
    split: list[str]  # the file's split
    va: np.ndarray  # float32 [n, 2]
    expr: np.ndarray  # int8 [n]
    au: np.ndarray  # int8 [n, 12]
    source: np.ndarray  # int: index into ``paths`` per row
    line: np.ndarray  # int: file line number per row
    paths: list[Path] = field(default_factory=list)
    bad_lines: list[str] = field(default_factory=list)

    def where(self, i: int) -> str:
        """``file:line`` of row ``i`` (for error messages)."""
        return f"{self.paths[int(self.source[i])]}:{int(self.line[i])}"


def _mtl_order(first: str, where: str) -> tuple[list[int] | None, bool]:
    """Column permutation (file column -> MTL_COLUMNS index) and whether line 1 is a header."""
    tokens = [t.strip() for t in first.lstrip("\ufeff").split(",")]
    if tokens and _MTL_PATH.fullmatch(tokens[0]):
        return None, False  # no header: canonical order
    if tokens and tokens[-1].lower() in ("aus", "au"):  # s-Aff-Wild2: "...,expression,aus" = 12 AU columns
        tokens = tokens[:-1] + list(AU_NAMES)
    known = {c.lower(): i for i, c in enumerate(MTL_COLUMNS)}
    order = [0] + [known.get(_MTL_ALIASES.get(t.lower(), t.lower()), -1) for t in tokens[1:]]
    if len(tokens) != len(MTL_COLUMNS) or -1 in order[1:] or len(set(order)) != len(order):
        raise ValueError(f"{where}: unknown MTL header {clip(first.strip())}; expected "
                         f"{','.join(MTL_COLUMNS)}")
    return order, True


def _mtl_row(tokens: list[str], order: list[int] | None) -> tuple[str, int, list[float]] | str:
    """One MTL line -> (video, frame, values in MTL_COLUMNS[1:] order), or why it is bad."""
    if len(tokens) != len(MTL_COLUMNS):
        return f"expected {len(MTL_COLUMNS)} columns, got {len(tokens)}"
    if order is not None:
        canon = [""] * len(tokens)
        for src, dst in enumerate(order):
            canon[dst] = tokens[src]
        tokens = canon
    m = _MTL_PATH.fullmatch(tokens[0].strip())
    if not m:
        return f"bad image path {clip(tokens[0])} (expected <video>/<frame>.jpg)"
    try:
        safe_name(m.group(1), "")
    except ValueError:
        return f"bad image path {clip(tokens[0])}: the video part must be a plain name (no folders, no '..')"
    if int(m.group(2)) > MAX_FRAME:
        return f"frame number {clip(m.group(2), 30)} is beyond {MAX_FRAME:,}"
    for h, part in ((_VA_H, tokens[1:3]), (_EXPR_H, tokens[3:4]), (_AU_H, tokens[4:])):
        why = _reason(h.task, h, part)
        if why is not None:
            return f"{h.task.upper()}: {why}"
    return m.group(1), int(m.group(2)), [float(t) for t in tokens[1:]]


def _mtl_fast(body: bytes, order: list[int] | None) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """Vectorized parse of MTL data lines: (videos, frames, values ``[n, 15]``), or ``None``."""
    names = [f"c{i}" for i in range(len(MTL_COLUMNS))]
    path_at = (order or [0]).index(0)
    table = _read_csv(body, {c: pa.string() if i == path_at else pa.float64() for i, c in enumerate(names)})
    if table is None:
        return None
    n = table.num_rows
    perm = order or list(range(len(MTL_COLUMNS)))
    vals = np.empty((n, len(MTL_COLUMNS) - 1), np.float64)
    path_col = None
    for src, dst in enumerate(perm):
        if dst == 0:
            path_col = table.column(src)
        else:
            vals[:, dst - 1] = table.column(src).to_numpy()
    parts = pc.extract_regex(path_col, r"^(?P<video>.+)/(?P<frame>[0-9]+)\.(?i:jpg)$")
    if parts.null_count:
        return None
    ok = (_check_values("va", _VA_H, vals[:, 0:2]) & _check_values("expr", _EXPR_H, vals[:, 2:3])
          & _check_values("au", _AU_H, vals[:, 3:]))
    if not ok.all():
        return None
    parts = parts.combine_chunks()
    videos = parts.field("video")
    if not all(is_safe_name(v) for v in pc.unique(videos).to_pylist()):
        return None  # the scanner names the file:line of the first hostile name
    digits = parts.field("frame")
    if len(digits) and pc.max(pc.utf8_length(digits)).as_py() >= len(str(MAX_FRAME)):
        return None  # a frame number past MAX_FRAME (or past int64): the scanner names the line
    frame = digits.to_numpy(zero_copy_only=False).astype(np.int64)
    return videos.to_pylist(), frame, vals



def parse_mtl(files: dict[str, Path], on_bad_line: str = "error") -> MTLParsed:
    """Parse the MTL files (``{"train": path, "val": path}``).

    Same two paths as the per-video files: a vectorized read that is used when every row is
    well formed, else the per-line scanner (exact ``file:line`` errors, or skip and count).
    """
    video: list[str] = []
    frames, vals, split, source, line = [], [], [], [], []
    bad: list[str] = []
    paths: list[Path] = []
    for sp in ("train", "val"):
        if sp not in files:
            continue
        path = Path(files[sp])
        paths.append(path)
        src = len(paths) - 1
        data = path.read_bytes()
        refuse_utf16(data, path)
        data = data.rstrip(b" \t\r\n")
        if not data:
            continue
        m = _NEWLINE.search(data)
        first = (data[: m.start()] if m else data).decode("utf-8", "replace")
        order, has_header = _mtl_order(first, f"{path}:1")
        body, first_line = (data[m.end():] if m else b"", 2) if has_header else (data, 1)
        fast = _mtl_fast(body, order) if body else ([], np.zeros(0, np.int64), np.zeros((0, 15)))
        if fast is not None:
            v, f, x = fast
            video += v
            frames.append(f)
            vals.append(x)
            line.append(np.arange(first_line, first_line + len(v)))
        else:
            rows_v, rows_f, rows_x, rows_l = [], [], [], []
            for i, text in enumerate(split_lines(body), start=first_line):
                row = _mtl_row(text.split(","), order)
                if isinstance(row, str):
                    if on_bad_line != "skip":
                        raise ValueError(f"{path}:{i}: {row}")
                    bad.append(f"{path}:{i}")
                    continue
                rows_v.append(row[0])
                rows_f.append(row[1])
                rows_x.append(row[2])
                rows_l.append(i)
            video += rows_v
            frames.append(np.array(rows_f, np.int64))
            vals.append(np.array(rows_x, np.float64).reshape(-1, len(MTL_COLUMNS) - 1))
            line.append(np.array(rows_l, np.int64))
        n = len(line[-1])
        split += [sp] * n
        source.append(np.full(n, src))
    cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape)  # noqa: E731
    raw = cat(vals, (0, len(MTL_COLUMNS) - 1))
    return MTLParsed(
        video, cat(frames, 0).astype(np.int32), split,
        _canonical("va", _VA_H, raw[:, 0:2])["va"],
        _canonical("expr", _EXPR_H, raw[:, 2:3])["expr"],
        _canonical("au", _AU_H, raw[:, 3:])["au"],
        cat(source, 0).astype(np.int64), cat(line, 0).astype(np.int64), paths, bad,
    )
