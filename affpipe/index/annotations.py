"""Find an Aff-Wild2 tree's layout (any ABAW edition) and parse its annotation files.

Parsing has two paths that must agree: a vectorized fast path (``pyarrow.csv`` on the whole
file, then numpy range checks) and a per-line reference scanner. The fast path is used when
it parses and validates cleanly; on any failure the reference scanner reruns the file, so the
error names the exact ``file:line`` (or, with ``on_bad_line="skip"``, skips and counts the
line). The property tests check the two paths agree on arbitrary input.
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from affpipe.index.folders import SPLIT_FOLDERS, Unused, scan_challenge, search_txt
from affpipe.index.testsets import is_test_list_name
from affpipe.io import clip, is_safe_name, safe_name
from affpipe.labels import AU_NAMES, EXPR_CLASSES, MAX_FRAME, NUM_AU, TASKS, VA_INVALID, VA_NAMES

log = logging.getLogger(__name__)

# Challenge folder name -> (task, edition rank, editions). A higher rank is a newer naming.
CHALLENGE_DIRS: dict[str, tuple[str, int, str]] = {
    "VA_Set": ("va", 1, "abaw1-2"),
    "VA_Estimation_Challenge": ("va", 3, "abaw3+"),
    "EXPR_Set": ("expr", 1, "abaw1-2"),
    "Expression_Set": ("expr", 1, "abaw1 (some copies)"),
    "EXPR_Classification_Challenge": ("expr", 3, "abaw3-5"),
    "EXPR_Recognition_Challenge": ("expr", 6, "abaw6+"),
    "AU_Set": ("au", 1, "abaw1-2"),
    "AU_Detection_Challenge": ("au", 3, "abaw3+"),
}
SPLIT_DIRS = SPLIT_FOLDERS  # every spelling the releases used (affpipe.index.folders)
MTL_FILES = {
    "training_set_annotations.txt": "train",
    "validation_set_annotations.txt": "val",
}
MTL_CHALLENGE_FILES = {"train_set.txt": "train", "validation_set.txt": "val"}
ON_BAD_LINE = ("error", "skip")

# No nested quantifiers over the same digits: "\d+\.?\d*" backtracks quadratically on a long
# run of digits that does not match (a 20 MB line took hours).
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_MAX_NUMBER_CHARS = 64
_NEWLINE = re.compile(rb"\r\n|\r|\n")  # the line terminators pyarrow.csv accepts
_FRAME_JPG = re.compile(r"\d+\.jpg", re.IGNORECASE)
_MAX_DEPTH = 8
_OTHER_AU = re.compile(r"AU\d+", re.IGNORECASE | re.ASCII)  # e.g. ABAW1's AU20


# --- layout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotationFile:
    """One ``<video>.txt`` of a challenge folder."""

    task: str
    split: str  # the folder it sits in: "train" | "val" (any spelling, see folders.SPLIT_FOLDERS)
    video: str
    path: Path


@dataclass(frozen=True)
class Layout:
    """What :func:`find_layout` found under a root."""

    root: Path
    challenges: dict[str, Path]  # task -> challenge folder used
    files: tuple[AnnotationFile, ...]
    image_roots: tuple[Path, ...]
    mtl_files: dict[str, Path] = field(default_factory=dict)  # split -> MTL file
    ignored: tuple[Path, ...] = ()  # older-edition challenge folders not used
    unused: tuple[Unused, ...] = ()  # every folder / .txt not read, with the reason
    test_lists: tuple[Path, ...] = ()  # test-set lists found in the tree (affpipe.index.testsets)

    def describe(self) -> dict:
        """JSON-able description for ``index.json``."""
        return {
            "root": str(self.root),
            "challenges": {
                t: {"folder": str(p), "name": p.name, "editions": CHALLENGE_DIRS[p.name][2],
                    "files": {s: sum(1 for f in self.files if f.task == t and f.split == s)
                              for s in ("train", "val")}}
                for t, p in self.challenges.items()
            },
            "image_roots": [str(p) for p in self.image_roots],
            "mtl_files": {s: str(p) for s, p in self.mtl_files.items()},
            "ignored": [str(p) for p in self.ignored],
            "unused": [u.describe() for u in self.unused],
            "test_lists": [str(p) for p in self.test_lists],
        }


def _subdirs(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return [e for e in it if not e.name.startswith(".") and e.is_dir()]
    except PermissionError as exc:  # a folder we cannot list hides annotations: say so
        raise PermissionError(exc.errno, "cannot list this folder (permission denied)", str(path)) from None
    except FileNotFoundError:  # removed while we walk
        return []


def _dir_key(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: the folder a link leads to
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _looks_like_image_root(subdirs: list[os.DirEntry]) -> bool:
    """A folder of ``<video>/<frame>.jpg``: one of its first subfolders holds frame JPEGs.

    Only the first entries of a few subfolders are read, so a 47k-frame video costs nothing.
    """
    for entry in sorted(subdirs, key=lambda e: e.name)[:3]:
        try:
            with os.scandir(entry.path) as it:
                for i, f in enumerate(it):
                    if _FRAME_JPG.fullmatch(f.name):
                        return True
                    if i >= 50:
                        break
        except OSError:
            continue
    return False


def find_layout(root: Path, images: tuple[Path, ...] = ()) -> Layout:
    """Search ``root`` recursively for challenge folders, MTL files and image roots.

    ``images`` (non-empty) replaces the automatic image-root search.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    found: dict[str, list[Path]] = {t: [] for t in TASKS}
    mtl: dict[str, list[Path]] = {"train": [], "val": []}
    image_roots: list[Path] = []
    test_lists: list[Path] = []
    # Each folder is entered once: a symlink back to an ancestor is a loop (an error), another
    # path to a folder already seen is skipped (it would count its challenge folders twice).
    seen: dict[tuple[int, int] | None, str] = {_dir_key(root): str(root)}
    stack: list[tuple[Path, int, tuple]] = [(root, 0, (_dir_key(root),))]
    while stack:
        d, depth, chain = stack.pop()
        subdirs = _subdirs(d)
        test_lists += _test_lists_in(d)
        for name, split in MTL_FILES.items():
            if (d / name).is_file():
                mtl[split].append(d / name)
        if d.name == "MTL_Challenge":
            for name, split in MTL_CHALLENGE_FILES.items():
                if (d / name).is_file():
                    mtl[split].append(d / name)
        if d.name in CHALLENGE_DIRS:
            found[CHALLENGE_DIRS[d.name][0]].append(d)
            continue
        if not images and _looks_like_image_root(subdirs):
            image_roots.append(d)
            continue
        if depth < _MAX_DEPTH:
            for e in subdirs:
                key = _dir_key(e.path)
                if key is None:  # cannot stat it: nothing to compare, and scandir will say why
                    stack.append((Path(e.path), depth + 1, chain))
                    continue
                if key in chain:
                    raise ValueError(f"{e.path}: symlink loop: it leads back to {seen.get(key, '?')}; "
                                     "affpipe follows no symlink twice")
                if key in seen:
                    log.warning("skipping %s: the same folder as %s (reached through a symlink)", e.path, seen[key])
                    continue
                seen[key] = e.path
                stack.append((Path(e.path), depth + 1, (*chain, key)))

    challenges: dict[str, Path] = {}
    ignored: list[Path] = []
    for task, dirs in found.items():
        if not dirs:
            continue
        best = max(CHALLENGE_DIRS[p.name][1] for p in dirs)
        top = sorted(p for p in dirs if CHALLENGE_DIRS[p.name][1] == best)
        if len(top) > 1:
            raise ValueError(
                f"{root}: {len(top)} {task.upper()} challenge folders of the same edition "
                f"({', '.join(map(str, top))}); point ROOT at one edition's tree"
            )
        challenges[task] = top[0]
        ignored += sorted(p for p in dirs if p != top[0])
    for p in ignored:
        log.warning("ignoring older-edition challenge folder %s", p)

    files, unused = [], [_ignored_folder(p, challenges) for p in ignored]
    for task, cdir in sorted(challenges.items()):
        contents = scan_challenge(cdir)
        files += [AnnotationFile(task, split, safe_name(video, f"{path.parent}: annotation file {clip(path.name)}"), path)
                  for split, video, path in contents.files]
        test_lists += contents.test_lists
        unused += contents.unused
    files.sort(key=lambda f: (f.task, f.split, f.video))

    mtl_files = {}
    for split, paths in mtl.items():
        if len(paths) > 1:
            raise ValueError(f"{root}: several MTL {split} files ({', '.join(map(str, sorted(paths)))})")
        if paths:
            mtl_files[split] = paths[0]
    roots = tuple(Path(p).resolve() for p in images) if images else tuple(sorted(image_roots))
    for p in roots:
        if not p.is_dir():
            raise ValueError(f"{p}: image root is not a directory")
    return Layout(root, challenges, tuple(files), roots, mtl_files, tuple(ignored), tuple(unused),
                  tuple(sorted(set(test_lists))))


def _test_lists_in(folder: Path) -> list[Path]:
    """Test-set lists directly in ``folder`` (recognised by name; see affpipe.index.testsets)."""
    try:
        with os.scandir(folder) as it:
            return [Path(e.path) for e in it if is_test_list_name(e.name) and e.is_file()]
    except OSError:
        return []


def _ignored_folder(path: Path, used: dict[str, Path]) -> Unused:
    task = CHALLENGE_DIRS[path.name][0]
    _, n = search_txt(path)
    return Unused(path, f"older-edition {task.upper()} folder ({n} .txt file(s) not read); "
                        f"{used[task].name} is used", n)


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
        data = path.read_bytes().rstrip(b" \t\r\n")
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
