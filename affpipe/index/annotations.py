"""Parse Aff-Wild2 annotation files: headers, values, invalid markers.

Parsing has two paths that must agree: a vectorized fast path (``pyarrow.csv`` on the whole
file, then numpy range checks) and a per-line reference scanner. The fast path is used when
it parses and validates cleanly; on any failure the reference scanner reruns the file, so the
error names the exact ``file:line`` (or, with ``on_bad_line="skip"``, skips and counts the
line). The property tests check the two paths agree on arbitrary input. Layout detection is
in ``affpipe.index.layout``, the s-Aff-Wild2 MTL files in ``affpipe.index.mtl``.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from affpipe.io import clip
from affpipe.labels import AU_NAMES, EXPR_CLASSES, NUM_AU, VA_INVALID, VA_NAMES

log = logging.getLogger(__name__)

ON_BAD_LINE = ("error", "skip")

# No nested quantifiers over the same digits: "\d+\.?\d*" backtracks quadratically on a long
# run of digits that does not match (a 20 MB line took hours).
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_MAX_NUMBER_CHARS = 64
_NEWLINE = re.compile(rb"\r\n|\r|\n")  # the line terminators pyarrow.csv accepts
_OTHER_AU = re.compile(r"AU\d+", re.IGNORECASE | re.ASCII)  # e.g. ABAW1's AU20


# --- headers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """A parsed header: which canonical column each file column maps to."""

    task: str
    names: tuple[str, ...]  # as written, normalized (stripped)
    columns: tuple[int, ...]  # va: index into VA_NAMES; expr: class index per header class;
    #                           au: AU index, -1 for an AU outside the 12 (ABAW1's AU20: read, not used)

    @property
    def ncols(self) -> int:
        """Value columns per data line (EXPR's header lists classes; its lines hold one index)."""
        return 1 if self.task == "expr" else len(self.columns)

    @property
    def unused(self) -> tuple[str, ...]:
        """Columns of the file that map to no label (their values are checked, then dropped)."""
        return tuple(n for n, c in zip(self.names, self.columns, strict=True) if c < 0)


def _split_header(line: str) -> list[str]:
    return [c.strip() for c in line.lstrip("\ufeff").split(",")]


def parse_header(line: str, task: str, where: str) -> Header:
    """Map a header line to canonical columns; ``ValueError`` naming ``where`` if unknown."""
    names = _split_header(line)
    vocab = {"va": VA_NAMES, "expr": EXPR_CLASSES, "au": AU_NAMES}[task]
    lower = {n.lower(): i for i, n in enumerate(vocab)}
    cols = [lower.get(n.lower()) for n in names]
    if task == "au":  # columns are mapped by name; an AU outside the 12 is read and reported, not used
        cols = [-1 if c is None and _OTHER_AU.fullmatch(n) else c for n, c in zip(names, cols, strict=True)]
    unknown = [n for n, c in zip(names, cols, strict=False) if c is None]
    mapped = [c for c in cols if c is not None and c >= 0]
    ok = not unknown and len(set(mapped)) == len(mapped) and len({n.lower() for n in names}) == len(names)
    if task == "au":
        ok = ok and bool(mapped)
    if task == "va":
        ok = ok and len(cols) == 2
    elif task == "expr":
        ok = ok and len(cols) in (7, 8)
    if not ok:
        why = f"unknown column(s) {clip(str(unknown))}" if unknown else "wrong or duplicate columns"
        raise ValueError(f"{where}: unknown {task.upper()} header {clip(line.strip())} ({why}); expected "
                         f"{','.join(vocab)}")
    return Header(task, tuple(names), tuple(cols))


# --- values ---------------------------------------------------------------------------------


@dataclass
class Parsed:
    """Labels of one file, one row per data line (line i labels frame i)."""

    n_lines: int
    present: np.ndarray  # bool [n]: False for skipped bad lines
    va: np.ndarray | None = None  # float32 [n, 2], NaN when invalid
    expr: np.ndarray | None = None  # int8 [n], -1 when invalid
    au: np.ndarray | None = None  # int8 [n, 12], -1 when invalid or absent
    bad_lines: list[int] = field(default_factory=list)  # file line numbers skipped
    header: Header | None = None


def _check_values(task: str, header: Header, vals: np.ndarray) -> np.ndarray:
    """Row-wise validity of raw float values ``[n, ncols]`` (True = acceptable)."""
    if task == "va":
        ok = (vals == VA_INVALID) | ((vals >= -1.0) & (vals <= 1.0))
    elif task == "expr":
        ok = (vals == -1) | ((vals >= 0) & (vals < len(header.columns)) & (vals == np.floor(vals)))
    else:
        ok = (vals == -1) | (vals == 0) | (vals == 1)
    return ok.all(axis=1)


def _canonical(task: str, header: Header, vals: np.ndarray) -> dict[str, np.ndarray]:
    """Raw validated values ``[n, ncols]`` -> canonical label arrays."""
    n = len(vals)
    if task == "va":
        out = np.empty((n, 2), np.float32)
        out[:, list(header.columns)] = vals
        out[(out == VA_INVALID).any(axis=1)] = np.nan  # one -5 discards the frame for VA
        return {"va": out}
    if task == "expr":
        lut = np.array((*header.columns, -1), np.int8)  # file class k -> canonical; -1 -> -1
        return {"expr": lut[vals[:, 0].astype(np.int64)]}
    out = np.full((n, NUM_AU), -1, np.int8)  # an AU the file does not annotate stays -1 (masked)
    used = [i for i, c in enumerate(header.columns) if c >= 0]
    out[:, [header.columns[i] for i in used]] = vals[:, used].astype(np.int8)
    return {"au": out}


def _reason(task: str, header: Header, tokens: list[str]) -> str | None:
    """Why one data line is bad (``None`` when it is fine) — the reference check."""
    if len(tokens) != header.ncols:
        return f"expected {header.ncols} column(s), got {len(tokens)}"
    vals = []
    for t in tokens:
        t = t.strip()
        if len(t) > _MAX_NUMBER_CHARS or not _NUMBER.fullmatch(t):
            return f"non-numeric value {clip(t)}"
        vals.append(float(t))
    arr = np.array([vals], np.float64)
    if not _check_values(task, header, arr)[0]:
        rng = {"va": "[-1, 1] or -5", "expr": f"a class 0..{len(header.columns) - 1} or -1",
               "au": "0, 1 or -1"}[task]
        return f"value out of range {clip(','.join(tokens))} (expected {rng})"
    return None


def refuse_utf16(data: bytes, path: Path | str) -> None:
    """A text file saved as UTF-16 (Windows' "Unicode"; with a byte-order mark or without) is
    refused naming the encoding and the fix, rather than read as a garbled header."""
    head = data[:512]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(f"{path}:1: UTF-16 text; save it as UTF-8")
    # UTF-16 without a mark: ASCII text with a zero byte beside every character
    odd, even = head[1::2], head[0::2]
    if len(head) >= 4 and (odd.count(0) > len(odd) // 2 or even.count(0) > len(even) // 2):
        raise ValueError(f"{path}:1: UTF-16 text (no byte-order mark); save it as UTF-8")


def split_lines(data: bytes) -> list[str]:
    """Lines as pyarrow.csv sees them (CRLF, CR or LF), trailing blank lines dropped."""
    data = data.rstrip(b" \t\r\n")
    return [s.decode("utf-8", "replace") for s in _NEWLINE.split(data)] if data else []


def _scan(task: str, header: Header, lines: list[str], path: Path, on_bad_line: str) -> Parsed:
    """Reference per-line parser; ``lines`` are the data lines (file line = index + 2)."""
    n = len(lines)
    raw = np.zeros((n, header.ncols), np.float64)
    present = np.ones(n, bool)
    bad: list[int] = []
    for i, line in enumerate(lines):
        tokens = line.split(",")
        why = _reason(task, header, tokens)
        if why is not None:
            if on_bad_line != "skip":
                raise ValueError(f"{path}:{i + 2}: {why}")
            present[i] = False
            bad.append(i + 2)
            raw[i] = -1 if task != "va" else VA_INVALID
            continue
        raw[i] = [float(t) for t in tokens]
    out = Parsed(n, present, bad_lines=bad, header=header, **_canonical(task, header, raw))
    return out


def _read_csv(body: bytes, column_types: dict[str, pa.DataType]) -> pa.Table | None:
    """Strict Arrow CSV read of header-less data lines (no quotes, no nulls, no empty lines
    skipped); ``None`` when any line does not fit, so the caller rescans line by line."""
    try:
        return pacsv.read_csv(
            io.BytesIO(body),
            read_options=pacsv.ReadOptions(column_names=list(column_types), use_threads=False),
            parse_options=pacsv.ParseOptions(quote_char=False, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                column_types=column_types, null_values=[], strings_can_be_null=False,
                quoted_strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def _fast(task: str, header: Header, body: bytes) -> Parsed | None:
    """Vectorized parse of the data lines; ``None`` when anything is off (caller rescans)."""
    ncol = header.ncols
    names = [f"c{i}" for i in range(ncol)]
    table = _read_csv(body, {c: pa.float64() for c in names})
    if table is None:
        return None
    n = table.num_rows
    vals = np.empty((n, ncol), np.float64)
    for i, c in enumerate(names):
        vals[:, i] = table.column(c).to_numpy()
    if not _check_values(task, header, vals).all():
        return None
    return Parsed(n, np.ones(n, bool), header=header, **_canonical(task, header, vals))


def parse_annotation(path: Path, task: str, on_bad_line: str = "error") -> Parsed:
    """Parse one per-video annotation file of ``task`` ("va" | "expr" | "au")."""
    if on_bad_line not in ON_BAD_LINE:
        raise ValueError(f"on_bad_line must be one of {ON_BAD_LINE}, not {on_bad_line!r}")
    data = Path(path).read_bytes()
    return parse_annotation_bytes(data, task, path, on_bad_line)


def parse_annotation_bytes(data: bytes, task: str, path: Path | str, on_bad_line: str = "error") -> Parsed:
    """:func:`parse_annotation` on the file's bytes (``path`` only names it in errors)."""
    refuse_utf16(data, path)
    m = _NEWLINE.search(data)
    head, body = (data[: m.start()], data[m.end():]) if m else (data, b"")
    if not head.strip():
        raise ValueError(f"{path}:1: missing header")
    header = parse_header(head.decode("utf-8", "replace"), task, f"{path}:1")
    body = body.rstrip(b" \t\r\n")
    if not body:
        return Parsed(0, np.zeros(0, bool), header=header, **_canonical(task, header, np.zeros((0, header.ncols))))
    fast = _fast(task, header, body)
    if fast is not None:
        return fast
    return _scan(task, header, split_lines(body), Path(path), on_bad_line)
