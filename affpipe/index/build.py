"""Build the label tables (``frames.parquet``, ``videos.parquet``, ``index.json``) from a tree.

One unit of work per video: parse its (up to three) annotation files with the vectorized
reader, list each of its image folders once with ``os.scandir`` and lay out its frame rows with
numpy. Videos are independent, so a small process pool spreads them over the cores; the main
process only concatenates columns and writes Parquet.

(About 500 lines: the per-video worker, the table assembly and the MTL table share the private
``_Video`` record; the layout search, parsers, release report and summary live beside it.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from affpipe.index.annotations import parse_annotation
from affpipe.index.layout import CHALLENGE_DIRS, Layout, find_layout
from affpipe.index.mtl import MTLParsed, parse_mtl
from affpipe.index.release import release_lines, release_report
from affpipe.index.testsets import TestRule, load_test_lists
from affpipe.io import atomic_write_text, safe_name, write_parquet
from affpipe.labels import (
    AU_NAMES,
    FRAMES_SCHEMA,
    MAX_FRAME,
    NUM_AU,
    SPLITS,
    TABLE_SCHEMA_VERSION,
    TASKS,
)
from affpipe.lineage import table_fingerprint
from affpipe.outdir import Owner, adopt, claim, preflight, unmarked_and_only_own

log = logging.getLogger(__name__)

# Below this many videos a process pool costs more than it saves.
TABLE_FILES = {"frames": "frames.parquet", "mtl": "mtl_frames.parquet"}  # the label tables
# The index folder is `affpipe index`'s own (affpipe.outdir): only these names, nothing of a user's.
INDEX_OWNER = Owner("index", ("frames.parquet", "mtl_frames.parquet", "videos.parquet", "index.json"))
_POOL_MIN_VIDEOS = 48


@dataclass(frozen=True)
class IndexConfig:
    """Options of ``affpipe index``."""

    root: Path
    out: Path
    images: tuple[Path, ...] = ()  # image roots; empty = find them under root
    on_bad_line: str = "error"  # "error" | "skip"
    workers: int = 2  # processes for the per-video work (1 = in this process)
    test_lists: tuple[Path, ...] = ()  # extra test-set lists (--test-list), besides those in the tree
    overwrite: bool = False  # an index of other inputs in ``out``: replace it (its files only)

    def inputs(self) -> dict:
        """What the index is made from (recorded in the folder's marker; a rerun into the folder
        must match): the tree, image roots, test lists (resolved) and the bad-line rule."""
        return {"root": str(Path(self.root).resolve()), "images": [str(Path(p).resolve()) for p in self.images],
                "test_lists": [str(Path(p).resolve()) for p in self.test_lists], "on_bad_line": self.on_bad_line}


@dataclass(frozen=True)
class _Job:
    video: str
    split: str
    files: tuple[tuple[str, str], ...]  # (task, path)
    image_dirs: tuple[tuple[int, str], ...]  # (root index, folder)
    on_bad_line: str


@dataclass
class _Video:
    """One video's frame rows plus its per-task statistics."""

    video: str
    split: str
    frames: np.ndarray  # int32, sorted
    image_root: np.ndarray  # int16, -1 without image
    odd_names: dict[int, str]  # row position -> file name when not "{frame:05d}.jpg"
    va: np.ndarray
    expr: np.ndarray
    au: np.ndarray
    annot: dict[str, np.ndarray]  # task -> bool per row: the frame has a line in that file
    stats: list[dict] = field(default_factory=list)
    headers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    bad_lines: list[str] = field(default_factory=list)
    duplicate_images: int = 0
    unused_columns: dict[str, int] = field(default_factory=dict)  # column outside the 12 AUs -> data lines


_FRAME_RE = re.compile(r"^(\d+)\.jpg$", re.M | re.I | re.A)
# names that are not "{frame:05d}.jpg": stem too short or zero-padded past 5, or ".JPG" etc.
_ODD_RES = (re.compile(r"^((\d{1,4}|0\d{5,})\.jpg)$", re.M | re.I | re.A),
            re.compile(r"^((\d+)\.(?!jpg$)[jJ][pP][gG])$", re.M | re.A))


def _check_frame_numbers(stems: list[str], folder: str) -> None:
    """A frame number past ``MAX_FRAME`` (a stray ``3000000000.jpg``) would size arrays by it."""
    digits = len(str(MAX_FRAME))
    if stems and max(map(len, stems)) >= digits:  # only long names are converted one by one
        for s in stems:
            if len(s) >= digits and int(s) > MAX_FRAME:
                name = s if len(s) <= 30 else s[:30] + "..."
                raise ValueError(f"{Path(folder) / name}.jpg: frame number {name} is beyond {MAX_FRAME:,}; "
                                 "not a frame of a video: remove or rename the file")


def _scan_images(dirs: tuple[tuple[int, str], ...]) -> tuple[np.ndarray, np.ndarray, dict[int, str], int]:
    """Frame numbers, root index and odd file names of one video's images; first root wins.

    One ``os.listdir`` per folder; the names are matched by one regex over the joined
    listing and converted by numpy, so no Python code runs per file (47k files per video).
    """
    frames, roots, odd = [], [], {}
    for r, d in dirs:
        try:
            joined = "\n".join(os.listdir(d))
        except FileNotFoundError:
            continue
        stems = _FRAME_RE.findall(joined)
        _check_frame_numbers(stems, d)
        frames.append(np.array(stems).astype(np.int64) if stems else np.zeros(0, np.int64))
        roots.append(np.full(len(stems), r, np.int16))
        for rx in _ODD_RES:
            for name, stem in rx.findall(joined):
                odd.setdefault((r, int(stem)), name)
    if not frames:
        return np.zeros(0, np.int64), np.zeros(0, np.int16), {}, 0
    allf, allr = np.concatenate(frames), np.concatenate(roots)
    uniq, first = np.unique(allf, return_index=True)  # first occurrence = earliest root
    names = {int(f): odd[(int(allr[i]), int(f))] for f, i in zip(uniq, first, strict=False) if (int(allr[i]), int(f)) in odd} if odd else {}
    return uniq, allr[first], names, len(allf) - len(uniq)


def _build_video(job: _Job) -> _Video:
    """Parse one video's files and images into frame rows (runs in a worker)."""
    parsed = {t: parse_annotation(Path(p), t, job.on_bad_line) for t, p in job.files}
    for t, p in job.files:
        if parsed[t].n_lines > MAX_FRAME:
            raise ValueError(f"{p}: {parsed[t].n_lines:,} data lines, more than the {MAX_FRAME:,} frames a video may have")
    img_frames, img_roots, odd, dup = _scan_images(job.image_dirs)
    top = max([p.n_lines for p in parsed.values()] + [int(img_frames.max()) if len(img_frames) else 0])
    present = np.zeros(top + 1, bool)
    present[img_frames] = True
    root = np.full(top + 1, -1, np.int16)
    root[img_frames] = img_roots
    va = np.full((top + 1, 2), np.nan, np.float32)
    expr = np.full(top + 1, -1, np.int8)
    au = np.full((top + 1, NUM_AU), -1, np.int8)
    annot = {}
    for t, p in parsed.items():
        a = np.zeros(top + 1, bool)
        a[1 : p.n_lines + 1] = p.present
        annot[t] = a
        present |= a
        sl = slice(1, p.n_lines + 1)
        if t == "va":
            va[sl] = p.va
        elif t == "expr":
            expr[sl] = p.expr
        else:
            au[sl] = p.au
    frames = np.flatnonzero(present)
    has = root[frames] >= 0
    n_img = int(len(img_frames))
    stats = []
    for t, p in parsed.items():
        a = annot[t][frames]
        valid = {"va": ~np.isnan(va[frames, 0]), "expr": expr[frames] >= 0,
                 "au": (au[frames] >= 0).any(axis=1)}[t] & a
        with_image = int((a & has).sum())
        stats.append({
            "video": job.video, "task": t, "split": job.split, "lines": p.n_lines,
            "bad_lines": len(p.bad_lines), "valid": int(valid.sum()),
            "valid_with_image": int((valid & has).sum()), "images": n_img,
            "lines_with_image": with_image, "lines_without_image": int(a.sum()) - with_image,
            "images_without_line": n_img - with_image, "mismatch": p.n_lines - n_img,
        })
    pos = {f: i for i, f in enumerate(frames.tolist())} if odd else {}
    video = _Video(
        job.video, job.split, frames.astype(np.int32), root[frames],
        {pos[f]: n for f, n in odd.items()}, va[frames], expr[frames], au[frames],
        {t: a[frames] for t, a in annot.items()}, stats,
        {t: p.header.names for t, p in parsed.items()},
        [f"{dict(job.files)[t]}:{ln}" for t, p in parsed.items() for ln in p.bad_lines], dup,
    )
    video.unused_columns = {f"{t}:{name}": int(p.present.sum()) for t, p in parsed.items() for name in p.header.unused}
    return video


def _jobs(layout: Layout, on_bad_line: str, extra_val: set[str] = frozenset(),
          test: TestRule | None = None) -> tuple[list[_Job], dict]:
    """One job per video; applies the split rule. Returns the jobs and split-rule counts.

    ``extra_val``: videos that are val for another reason (the MTL validation file).
    ``test``: the test-set rule (:class:`affpipe.index.testsets.TestRule`); a test video is
    never train or val.
    """
    by_video: dict[str, dict[str, tuple[str, Path]]] = {}
    for f in layout.files:
        tasks = by_video.setdefault(f.video, {})
        if f.task in tasks:
            raise ValueError(f"{f.video} has two {f.task.upper()} files: {tasks[f.task][1]} and {f.path}")
        tasks[f.task] = (f.split, f.path)
    images: dict[str, list[tuple[int, str]]] = {}
    for r, root in enumerate(layout.image_roots):
        with os.scandir(root) as it:
            for e in it:
                if e.is_dir() and not e.name.startswith("."):
                    name = safe_name(e.name, f"{root}: image folder")
                    images.setdefault(name, []).append((r, e.path))
    val_videos = {v for v, t in by_video.items() if any(s == "val" for s, _ in t.values())} | set(extra_val)
    conflicts = sorted(v for v in val_videos if any(s == "train" for s, _ in by_video.get(v, {}).values()))
    test_videos, test_report = (test or TestRule()).resolve(set(by_video), set(images))
    jobs = [
        _Job(v, "test" if v in test_videos else "val" if v in val_videos else "train",
             tuple((t, str(p)) for t, (_, p) in sorted(by_video.get(v, {}).items())),
             tuple(images.get(v, ())), on_bad_line)
        for v in sorted(set(by_video) | set(images))
    ]
    return jobs, {"split_conflicts": len(conflicts), "split_conflict_videos": conflicts,
                  "val_videos": val_videos, "test_videos": test_videos,
                  "test": test_report}


def _run_jobs(jobs: list[_Job], workers: int) -> list[_Video]:
    bar = dict(total=len(jobs), desc="index", unit="video", leave=False)
    if workers <= 1 or len(jobs) < _POOL_MIN_VIDEOS:
        return [_build_video(j) for j in tqdm(jobs, **bar)]
    # fork where there is one: workers start instantly and need no importable __main__ (spawn
    # re-imports the caller's script). They only read files, numpy and single-threaded
    # pyarrow.csv, and Arrow re-initializes its thread pools after a fork.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers) as pool:
        return list(tqdm(pool.imap(_build_video, jobs, chunksize=4), **bar))


def _table(videos: list[str], vid: np.ndarray, frame: np.ndarray, split: np.ndarray,
           root: np.ndarray, odd: dict[int, str], va: np.ndarray, expr: np.ndarray,
           au: np.ndarray) -> pa.Table:
    """Assemble a ``FRAMES_SCHEMA`` table; rows must already be sorted by (video, frame)."""
    n = len(frame)
    video_col = pa.DictionaryArray.from_arrays(pa.array(vid, pa.int32()), pa.array(videos, pa.string())).cast(pa.string())
    has = root >= 0
    # "<video>/<frame:05d>.jpg" built in Arrow, not per row in Python.
    padded = pc.utf8_lpad(pc.cast(pa.array(frame, pa.int32()), pa.string()), 5, "0")
    image = pc.binary_join_element_wise(video_col, pc.binary_join_element_wise(padded, "jpg", "."), "/")
    if odd:
        fix = np.array(image.to_pylist(), dtype=object)
        for i, name in odd.items():
            fix[i] = f"{videos[vid[i]]}/{name}"
        image = pa.array(fix, pa.string())
    image = pc.if_else(pa.array(has), image, pa.scalar(None, pa.string()))
    cols = {
        "row_id": pa.array(np.arange(n, dtype=np.int64)),
        "video": video_col,
        "frame": pa.array(frame, pa.int32()),
        "split": pa.DictionaryArray.from_arrays(pa.array(split.astype(np.int8)), pa.array(list(SPLITS))).cast(pa.string()),
        "image": image,
        "image_root": pa.array(root.astype(np.int16)),
        "has_image": pa.array(has),
        "valence": pa.array(va[:, 0].astype(np.float32)),
        "arousal": pa.array(va[:, 1].astype(np.float32)),
        "va_valid": pa.array(~np.isnan(va[:, 0]) & ~np.isnan(va[:, 1])),
        "expr": pa.array(expr.astype(np.int8)),
        "expr_valid": pa.array(expr >= 0),
        **{a: pa.array(np.ascontiguousarray(au[:, i]).astype(np.int8)) for i, a in enumerate(AU_NAMES)},
        "au_valid": pa.array((au >= 0).any(axis=1) if n else np.zeros(0, bool)),
    }
    return pa.table([cols[f.name] for f in FRAMES_SCHEMA], schema=FRAMES_SCHEMA)


def _frames_table(results: list[_Video]) -> pa.Table:
    lens = [len(r.frames) for r in results]
    odd = {}
    start = 0
    for r, n in zip(results, lens, strict=False):
        odd.update({start + i: name for i, name in r.odd_names.items()})
        start += n
    cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape)  # noqa: E731
    return _table(
        [r.video for r in results],
        np.repeat(np.arange(len(results)), lens),
        cat([r.frames for r in results], 0).astype(np.int32),
        np.repeat(np.array([SPLITS.index(r.split) for r in results], np.int8), lens),
        cat([r.image_root for r in results], 0).astype(np.int16),
        odd,
        cat([r.va for r in results], (0, 2)),
        cat([r.expr for r in results], 0),
        cat([r.au for r in results], (0, NUM_AU)),
    )


def _task_counts(results: list[_Video]) -> dict:
    counts: dict = {t: {s: {"files": 0, "lines": 0, "valid": 0, "valid_with_image": 0} for s in SPLITS} for t in TASKS}
    for r in results:
        for st in r.stats:
            c = counts[st["task"]][st["split"]]
            c["files"] += 1
            for k in ("lines", "valid", "valid_with_image"):
                c[k] += st[k]
    return counts


def _mtl_table(m: MTLParsed, results: list[_Video], val_videos: set[str],
               test_videos: set[str] = frozenset()) -> tuple[pa.Table, dict]:
    """The MTL rows (duplicates collapsed), with image lookups from the per-video results."""
    videos = sorted(set(m.video))
    code = {v: i for i, v in enumerate(videos)}
    vid = np.array([code[v] for v in m.video], np.int64)
    order = np.lexsort((m.frame, vid))
    vid, frame = vid[order], m.frame[order]
    va, expr, au = m.va[order], m.expr[order], m.au[order]
    same = (vid[1:] == vid[:-1]) & (frame[1:] == frame[:-1])
    for i in np.flatnonzero(same):
        a, b = order[i], order[i + 1]
        equal = (np.array_equal(m.va[a], m.va[b], equal_nan=True) and m.expr[a] == m.expr[b]
                 and np.array_equal(m.au[a], m.au[b]))
        if not equal:
            raise ValueError(f"{m.where(a)} and {m.where(b)}: conflicting duplicate MTL rows for "
                             f"{m.video[a]}/{int(m.frame[a]):05d}.jpg")
    keep = np.concatenate([[True], ~same]) if len(vid) else np.zeros(0, bool)
    vid, frame, va, expr, au = vid[keep], frame[keep], va[keep], expr[keep], au[keep]
    file_val = {m.video[i] for i in range(len(m.video)) if m.split[i] == "val"}
    is_val = np.array([videos[v] in val_videos or videos[v] in file_val for v in vid], bool)
    split = np.where(np.array([videos[v] in test_videos for v in vid], bool), 2, is_val).astype(np.int8)
    root = np.full(len(vid), -1, np.int16)
    odd: dict[int, str] = {}
    by_name = {r.video: r for r in results}
    starts = np.searchsorted(vid, np.arange(len(videos) + 1))
    for v, name in enumerate(videos):
        r = by_name.get(name)
        lo, hi = starts[v], starts[v + 1]
        if r is None or lo == hi:
            continue
        pos = np.searchsorted(r.frames, frame[lo:hi])
        pos_c = np.minimum(pos, max(len(r.frames) - 1, 0))
        hit = (pos < len(r.frames)) & (r.frames[pos_c] == frame[lo:hi]) if len(r.frames) else np.zeros(hi - lo, bool)
        root[lo:hi] = np.where(hit, r.image_root[pos_c] if len(r.frames) else -1, -1)
        for j in np.flatnonzero(hit):
            if int(pos_c[j]) in r.odd_names:
                odd[lo + int(j)] = r.odd_names[int(pos_c[j])]
    table = _table(videos, vid, frame, split, root, odd, va, expr, au)
    counts = {"rows": table.num_rows, "lines": len(m.video) + len(m.bad_lines),
              "duplicates_collapsed": int(same.sum()), "bad_lines": len(m.bad_lines),
              "with_image": int((root >= 0).sum()),
              **{f"{s}_rows": int((split == k).sum()) for k, s in enumerate(SPLITS)}}
    return table, counts


def build_index(cfg: IndexConfig) -> dict:
    """Index the tree under ``cfg.root`` into ``cfg.out``; returns the summary (index.json's counts).

    ``cfg.out`` is claimed first (:mod:`affpipe.outdir`): a folder holding anything ``index`` did
    not write is refused, one writer at a time, and an index of other inputs is replaced only with
    ``cfg.overwrite``. A rerun with the same inputs rewrites the index in place.
    """
    out = Path(cfg.out)
    if unmarked_and_only_own(out, INDEX_OWNER) and _is_index_json(out / "index.json"):
        # an index folder of affpipe 0.2 (no marker): adopted with what it records it was made from,
        # so an index of another root is refused below (or replaced with --overwrite), never taken as this one
        adopt(out, INDEX_OWNER, recorded_inputs(out / "index.json"))
    preflight(out, INDEX_OWNER, cfg.inputs(), overwrite=cfg.overwrite)  # refused before the work, not after
    with contextlib.ExitStack() as held:
        return _build(cfg, held)


def recorded_inputs(path: Path) -> dict:
    """What an ``index.json`` says its index was made from, as :meth:`IndexConfig.inputs` puts it
    (the tree, image roots, test lists resolved; the bad-line rule); an index that records no
    options gets inputs no rerun matches."""
    meta = json.loads(Path(path).read_text())
    opts = meta.get("options")
    if not isinstance(opts, dict) or not isinstance(opts.get("root"), str):
        return {"root": f"(not recorded in {path})"}

    def paths(key: str) -> list[str]:
        value = opts.get(key) or []
        return [str(Path(p).resolve()) for p in value] if isinstance(value, list) else [f"(unreadable {key})"]

    return {"root": str(Path(opts["root"]).resolve()), "images": paths("images"), "test_lists": paths("test_lists"),
            "on_bad_line": opts.get("on_bad_line", "error")}


def _is_index_json(path: Path) -> bool:
    """``path`` is an ``index.json`` affpipe wrote (not a user's file of that name)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("schema_version"), int) and isinstance(meta.get("counts"), dict)


def _build(cfg: IndexConfig, held: contextlib.ExitStack) -> dict:
    """:func:`build_index`; the folder is claimed (into ``held``) once the tables are made.

    (Slightly over 60 lines: the stages in the order they run — layout, per-video jobs, tables,
    MTL, writes — read best as one list.)
    """
    t0 = time.perf_counter()
    layout = find_layout(cfg.root, tuple(cfg.images))
    annotated_tree = bool(layout.files or layout.mtl_files)
    if not annotated_tree and not layout.image_roots:  # neither labels nor crops: a wrong folder
        raise ValueError(f"{layout.root}: no challenge folders ({', '.join(sorted(CHALLENGE_DIRS))}), "
                         "no MTL files and no image root (<video>/<frame>.jpg folders, such as cropped_aligned/) "
                         "found")
    if not annotated_tree:  # a tree of crops alone (affpipe crop's): every video is a test video
        log.warning("%s: no annotation file found; indexing the crops alone (every video split test)", layout.root)
    if not layout.image_roots:
        log.warning("no image roots found under %s (use --images DIR)", layout.root)
    log.info("layout: %s; image roots: %s", {t: p.name for t, p in layout.challenges.items()},
             [str(p) for p in layout.image_roots])
    mtl = parse_mtl(layout.mtl_files, cfg.on_bad_line) if layout.mtl_files else None
    # the MTL validation videos take part in the split rule too
    mtl_val = {v for v, sp in zip(mtl.video, mtl.split, strict=False) if sp == "val"} if mtl else set()
    found, not_lists = load_test_lists(layout.test_lists, strict=False)
    rule = TestRule(found + load_test_lists(cfg.test_lists)[0], frozenset(mtl.video) if mtl else frozenset())
    jobs, split_info = _jobs(layout, cfg.on_bad_line, mtl_val, rule)
    results = _run_jobs(jobs, cfg.workers)
    _check_some_images(layout, results)
    frames = _frames_table(results)
    # claimed only now: bad input found above leaves no folder behind
    folder = held.enter_context(claim(cfg.out, INDEX_OWNER, cfg.inputs(), overwrite=cfg.overwrite))
    write_parquet(frames, folder.path(TABLE_FILES["frames"]), compression="zstd")
    stats = [s for r in results for s in r.stats]
    videos = pa.Table.from_pylist(stats, schema=VIDEOS_SCHEMA) if stats else VIDEOS_SCHEMA.empty_table()
    write_parquet(videos, folder.path("videos.parquet"), compression="zstd")

    has = frames.column("has_image").to_numpy()
    annotated = np.zeros(frames.num_rows, bool)
    for r_start, r in zip(np.cumsum([0] + [len(r.frames) for r in results]), results, strict=False):
        annotated[r_start : r_start + len(r.frames)] = np.any([a for a in r.annot.values()], axis=0) if r.annot else False
    bad = [b for r in results for b in r.bad_lines]
    counts = {
        "frames": frames.num_rows,
        "videos": len(results),
        "with_image": int(has.sum()),
        "splits": {s: int(pc.sum(pc.equal(frames.column("split"), s)).as_py() or 0) for s in SPLITS},
        "tasks": _task_counts(results),
        "missing_images": int((annotated & ~has).sum()),
        # crops with no valid label of any task, per split: what only pre-training can use
        "unlabelled_crops": _unlabelled_crops(frames, has),
        "images_without_line": int((~annotated & has).sum()),
        "line_image_mismatches": sum(1 for s in stats if s["mismatch"] != 0),
        "split_conflicts": split_info["split_conflicts"],
        "duplicate_images": sum(r.duplicate_images for r in results),
        "bad_lines": len(bad),
        "bad_line_locations": bad[:100],
        "expr_headers": _header_kinds(results, "expr"),
        "au_headers": _header_kinds(results, "au"),
        **release_report(layout, [r.unused_columns for r in results], split_info["test"], not_lists),
    }
    fingerprints = {"frames": table_fingerprint(frames)}
    if mtl is not None:
        mtl_table, counts["mtl"] = _mtl_table(mtl, results, split_info["val_videos"], split_info["test_videos"])
        write_parquet(mtl_table, folder.path(TABLE_FILES["mtl"]), compression="zstd")
        fingerprints["mtl"] = table_fingerprint(mtl_table)
    else:  # a rerun without MTL files: no MTL table of the earlier inputs is left beside this one
        folder.path(TABLE_FILES["mtl"]).unlink(missing_ok=True)
    counts["annotations"] = annotated_tree
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    meta = {
        "schema_version": TABLE_SCHEMA_VERSION,
        "image_roots": [str(p) for p in layout.image_roots],
        "layouts": layout.describe(),
        "counts": counts,
        "options": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, tuple) else v)
                    for k, v in asdict(cfg).items() if k != "overwrite"},
        "split_conflict_videos": split_info["split_conflict_videos"],
        "fingerprint": fingerprints,  # what shards, feature tables and runs record (affpipe.lineage)
    }
    atomic_write_text(folder.path("index.json"), json.dumps(meta, indent=2) + "\n")
    log.info("indexed %d frames of %d videos in %.1f s", counts["frames"], counts["videos"], counts["seconds"])
    return counts


VIDEOS_SCHEMA = pa.schema(
    [("video", pa.string()), ("task", pa.string()), ("split", pa.string()),
     *[(k, pa.int64()) for k in ("lines", "bad_lines", "valid", "valid_with_image", "images",
                                 "lines_with_image", "lines_without_image", "images_without_line",
                                 "mismatch")]]
)


def _check_some_images(layout: Layout, results: list[_Video]) -> None:
    """Image folders given or found that hold not one frame of the annotated videos are a wrong
    image folder, never a dataset: stop. (With no image folder at all, an annotation-only index,
    the warning above stands and ``shard`` refuses the empty splits.)"""
    annotated = [r.video for r in results if r.annot and any(a.any() for a in r.annot.values())]
    if layout.image_roots and annotated and not any((r.image_root >= 0).any() for r in results):
        roots = ", ".join(map(str, layout.image_roots))
        raise ValueError(
            f"{layout.root}: no frame image found for any of the {len(annotated)} annotated videos "
            f"(image roots: {roots}); point --images at the folder holding <video>/<frame>.jpg"
        )



def _unlabelled_crops(frames: pa.Table, has: np.ndarray) -> dict[str, int]:
    labelled = np.zeros(frames.num_rows, bool)
    for t in TASKS:
        labelled |= frames.column(f"{t}_valid").to_numpy(zero_copy_only=False)
    split = frames.column("split").to_numpy(zero_copy_only=False)
    return {s: int((has & ~labelled & (split == s)).sum()) for s in SPLITS}


def _header_kinds(results: list[_Video], task: str) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in results:
        if task in r.headers:
            k = f"{len(r.headers[task])} {'classes' if task == 'expr' else 'AUs'}"
            kinds[k] = kinds.get(k, 0) + 1
    return kinds



def load_index(path: Path, *, table: str = "frames") -> tuple[pa.Table, dict]:
    """Read an index folder: the ``frames`` (or ``mtl``) table and the ``index.json`` dict."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    name = TABLE_FILES.get(table)
    if name is None:
        raise ValueError(f"table must be 'frames' or 'mtl', not {table!r}")
    meta_path = path / "index.json"
    if not meta_path.is_file():
        raise ValueError(f"{path}: not an index folder (no index.json); run `affpipe index` first")
    if not (path / name).is_file():
        raise ValueError(f"{path}: no {name} (the tree had no MTL files)" if table == "mtl" else f"{path}: no {name}")
    meta = json.loads(meta_path.read_text())
    if meta.get("schema_version") != TABLE_SCHEMA_VERSION:
        raise ValueError(f"{meta_path}: schema version {meta.get('schema_version')} != {TABLE_SCHEMA_VERSION}; "
                         "re-run `affpipe index`")
    return pq.read_table(path / name, schema=FRAMES_SCHEMA), meta


def row_positions(table: pa.Table):
    """A function mapping row ids to their positions in ``table`` (a label table); it raises
    ``KeyError`` with the count of row ids the table lacks."""
    rid = table.column("row_id").to_numpy()
    order = np.argsort(rid, kind="stable")
    sorted_rid = rid[order]

    def positions(row_id: np.ndarray) -> np.ndarray:
        row_id = np.asarray(row_id)
        pos = order[np.clip(np.searchsorted(sorted_rid, row_id), 0, max(len(rid) - 1, 0))]
        if len(row_id) and not (rid[pos] == row_id).all():
            raise KeyError(int((rid[pos] != row_id).sum()))
        return pos

    return positions


def index_fingerprint(path: Path, table: str = "frames") -> str:
    """The fingerprint of an index's ``table`` (``frames`` or ``mtl``): its rows' identity and
    labels, as ``index.json`` records it (computed from the table for an index written before
    fingerprints). Shards, feature tables and runs record it and check it on open. Reads
    only ``index.json`` when it records the fingerprint (every index since 0.3)."""
    folder = Path(path).parent if Path(path).is_file() else Path(path)
    try:
        recorded = (json.loads((folder / "index.json").read_text()).get("fingerprint") or {}).get(table)
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str):
        return recorded
    rows, meta = load_index(path, table=table)
    return fingerprint_of(rows, meta, table)


def fingerprint_of(rows: pa.Table, meta: dict, table: str = "frames") -> str:
    """:func:`index_fingerprint` of an index already read with ``load_index`` (``rows``, ``meta``)."""
    recorded = (meta.get("fingerprint") or {}).get(table)
    return recorded if isinstance(recorded, str) else table_fingerprint(rows)


def image_path(index_meta: dict, image_root: int, image: str) -> Path:
    """Absolute path of a frame's image from its ``image_root`` and ``image`` columns."""
    if image is None or image_root is None or image_root < 0:
        raise ValueError("frame has no image (image_root -1)")
    return Path(index_meta["image_roots"][int(image_root)]) / image


def format_summary(counts: dict) -> str:
    """Human-readable summary of :func:`build_index`'s counts (printed by the CLI)."""
    rows = [f"{counts['frames']} frames of {counts['videos']} videos "
            f"(train {counts['splits']['train']}, val {counts['splits']['val']}, test {counts['splits'].get('test', 0)}), "
            f"{counts['with_image']} with an image, in {counts.get('seconds', 0):.1f} s",
            f"{'task':<5} {'split':<5} {'files':>6} {'lines':>10} {'valid':>10} {'valid+image':>12}"]
    for t, by_split in counts["tasks"].items():
        for s, c in by_split.items():
            if s == "test" and not c["files"]:
                continue
            rows.append(f"{t:<5} {s:<5} {c['files']:>6} {c['lines']:>10} {c['valid']:>10} {c['valid_with_image']:>12}")
    rows += [
        f"missing images (line, no image): {counts['missing_images']}; images without a line: "
        f"{counts['images_without_line']}",
        f"line/image count mismatches (video x task): {counts['line_image_mismatches']}",
        f"split conflicts resolved (train files of val videos): {counts['split_conflicts']}",
        f"bad lines skipped: {counts['bad_lines']}",
    ]
    if "mtl" in counts:
        m = counts["mtl"]
        rows.append(f"MTL: {m['rows']} rows (train {m['train_rows']}, val {m['val_rows']}), "
                    f"{m['with_image']} with image, {m['duplicates_collapsed']} duplicates collapsed, "
                    f"{m['bad_lines']} bad lines skipped")
    if counts.get("annotations") is False:
        rows.insert(1, "no annotation files in this tree: images alone, every video split test "
                       "(for predict; train needs labels)")
    return "\n".join(rows + release_lines(counts))
