"""Pack the label table and its JPEGs into WebDataset tar shards with DALI indexes.

One sample = ``<key>.jpg`` (the source bytes, never re-encoded) + ``<key>.lbl`` (the 32-byte
record of :mod:`affpipe.labels`), key = ``f"{row_id:010d}"``. Output::

    out/<split>/<split>-000000.tar   + .idx beside it (wds2idx's v1.2 format)
    out/.state/<split>-000000.json   what each finished shard was written from (for resume)
    out/manifest.json                written last, atomically

Rows are kept when they have an image and at least one valid label of the chosen tasks; the
others are counted per reason (``no_image``, ``no_label``). The ``test`` split keeps every frame
with an image, and its records carry no label (every mask false; ``labels.records_from_table``).

Unlabelled frames (an image, no valid label of the chosen tasks) of train and val go, by default
(``unlabelled=False`` / ``--no-unlabelled``: counted as ``no_label`` as before), into shards of
their own, ``<split>/<split>-unlabelled-NNNNNN.tar``, listed under the split's ``unlabelled``
key of the manifest, with records that carry no label (every mask false). They are never mixed
into the labelled shards: those keep the bytes, plan digest and manifest fingerprint they have
without them, so supervised loaders (which read ``shards`` only) see exactly the same batches.
Only pre-training reads them (``affpipe.shards.format.pretrain_shard_paths``).
An image the index lists but the disk lacks is an error naming the file (the index is stale; a
silently smaller dataset would be worse), not a skip.

Deterministic: the shard plan (which rows go in which shard, in which order) depends only on
the index, the options and the seed; tar headers carry fixed metadata (mtime 0, uid/gid 0,
mode 0644, ustar), so the same inputs give byte-identical shards. Train is shuffled globally
(DALI only shuffles inside a buffer); val keeps (video, frame) order.

Crash safety: a shard is written to ``*.tar.tmp``/``*.idx.tmp``, fsynced, then the index and
the state record are renamed into place and the tar last, so "the tar exists" means "complete".
A rerun removes temporary files and keeps every finished shard whose state record matches its
plan and whose bytes still hash to the recorded sha256; the rest is rewritten. The manifest is
removed when a run starts and written when every shard is complete, so "manifest.json exists"
means "every shard it lists is whole". A second run into a folder being written is refused
(``.lock``), and files affpipe did not write are never deleted (:mod:`affpipe.shards.folder`).

Bad frames (:mod:`affpipe.shards.checks`): zero-byte or non-JPEG files are skipped and counted
(``bad_image``, listed in the manifest); a frame of another size than the shards' one
``frame_size`` is refused, or re-encoded with ``resize_off_size``.

(About 450 lines: the plan — labelled and unlabelled shards — and the crash-safe writer share ``ShardSpec``; the format
itself is in ``affpipe.shards.format``, the folder's ownership in ``affpipe.shards.folder``.)
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import multiprocessing as mp
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from affpipe.index.build import TABLE_FILES, fingerprint_of, load_index
from affpipe.io import atomic_write_text, fsync_dir, sha256_file
from affpipe.labels import RECORD_SIZE, RECORD_VERSION, SPLITS, TASKS, records_from_table
from affpipe.shards.checks import (
    DEFAULT_FRAME_SIZE,
    check_frame,
    check_image_paths,
    check_not_empty,
    common_frame_size,
    jpeg_size,
)
from affpipe.shards.folder import (
    check_inputs,
    check_output_folder,
    record_inputs,
    remove_own,
    remove_stale,
    remove_temporaries,
    writer_lock,
)
from affpipe.shards.format import (
    BLOCK,
    MANIFEST_SCHEMA_VERSION,
    index_reference,
    remove_manifest,
    shards_fingerprint,
    tar_end_padding,
    tar_header,
    write_idx_lines,
    write_manifest,
)
from affpipe.shards.unlabelled import ordered_unlabelled, recorded_skips

log = logging.getLogger(__name__)

# ~50k frames of ~5 KB (+ ~1.8 KB tar headers/padding per sample) ≈ 340 MB per shard: large
# enough for sequential reads, small enough that a split has several shards to spread over ranks.
DEFAULT_SAMPLES_PER_SHARD = 50_000
_FLUSH_BYTES = 8 << 20


@dataclass(frozen=True)
class ShardConfig:
    """Options of ``affpipe shard``; ``samples_per_shard=None`` → ``DEFAULT_SAMPLES_PER_SHARD``."""

    index: Path
    out: Path
    split: str = "all"
    table: str = "frames"
    tasks: tuple[str, ...] = ("va", "expr", "au")
    samples_per_shard: int | None = None
    workers: int = 2
    seed: int = 0
    frame_size: int | None = None  # frames must be frame_size² (None: the size most sampled frames have)
    resize_off_size: bool = False  # re-encode frames of another size to frame_size, on purpose
    overwrite: bool = False  # shards of other inputs in ``out``: delete them (our files only) and start afresh
    unlabelled: bool = True  # also write train/val frames without a label, in shards of their own

    def __post_init__(self) -> None:
        if self.split not in (*SPLITS, "all"):
            raise ValueError(f"split must be one of {(*SPLITS, 'all')}, got {self.split!r}")
        if self.table not in TABLE_FILES:
            raise ValueError(f"table must be one of {tuple(TABLE_FILES)}, got {self.table!r}")
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks!r}")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.frame_size is not None and not 1 <= self.frame_size <= 65535:
            raise ValueError(f"frame_size must be in [1, 65535], got {self.frame_size}")

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.split == "all" else (self.split,)

    def options(self) -> dict[str, Any]:
        """The options that determine the output (``workers`` does not)."""
        return {
            "split": self.split,
            "table": self.table,
            "tasks": sorted(self.tasks),
            "samples_per_shard": self.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD,
            "seed": self.seed,
            "frame_size": self.frame_size,
            "resize_off_size": self.resize_off_size,
            "unlabelled": self.unlabelled,
        }

    def labelled_options(self) -> dict[str, Any]:
        """The options the labelled shards depend on (their plan digest): ``unlabelled`` does not
        change them, so a folder written without unlabelled frames resumes in place."""
        return {k: v for k, v in self.options().items() if k != "unlabelled"}


# ---- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    """One shard to write: everything the worker needs, and nothing it must look up."""

    split: str
    number: int
    out: str
    keys: list[str]
    paths: list[str]
    records: bytes  # RECORD_SIZE bytes per sample, in order
    plan_digest: str
    frame_size: int = 112
    resize_off_size: bool = False
    unlabelled: bool = False  # one of the split's unlabelled shards (pre-training only)

    @property
    def name(self) -> str:
        return f"{self.split}-{'unlabelled-' if self.unlabelled else ''}{self.number:06d}"

    @property
    def tar(self) -> Path:
        return Path(self.out) / self.split / f"{self.name}.tar"

    @property
    def idx(self) -> Path:
        return Path(self.out) / self.split / f"{self.name}.idx"

    @property
    def state(self) -> Path:
        return Path(self.out) / ".state" / f"{self.name}.json"


def load_table(index: Path, table: str = "frames") -> tuple[pa.Table, dict]:
    """The label table (``frames.parquet`` or ``mtl_frames.parquet``) and ``index.json``."""
    tbl, meta = load_index(Path(index), table=table)
    if "image_roots" not in meta:
        raise ValueError(f"{Path(index) / 'index.json'}:1: no 'image_roots' key")
    return tbl, meta


def select_rows(tbl: pa.Table, split: str, tasks: tuple[str, ...]) -> tuple[pa.Table, dict[str, int]]:
    """Rows of ``split`` that can become samples, sorted by (video, frame); skip counts by reason."""
    tbl = tbl.filter(pc.equal(tbl["split"], split))
    has_image = tbl["has_image"].to_numpy(zero_copy_only=False) & tbl["image"].is_valid().to_numpy(zero_copy_only=False)
    labelled = np.zeros(len(tbl), bool)
    for t in tasks:
        labelled |= tbl[f"{t}_valid"].to_numpy(zero_copy_only=False)
    if split == "test":  # every frame with a crop gets a prediction; its record carries no label
        labelled[:] = True
    skipped = {"no_image": int((~has_image).sum()), "no_label": int((has_image & ~labelled).sum())}
    kept = tbl.filter(pa.array(has_image & labelled))
    return kept.sort_by([("video", "ascending"), ("frame", "ascending")]), skipped


def ordered_rows(cfg: ShardConfig, tbl: pa.Table, split: str) -> tuple[pa.Table, dict[str, int]]:
    """The rows of ``split`` in the order they are written (train: one global seeded shuffle)."""
    kept, skipped = select_rows(tbl, split, cfg.tasks)
    if split == "train":
        order = np.random.default_rng(cfg.seed).permutation(len(kept))
        kept = kept.take(pa.array(order, pa.int64()))
    return kept, skipped


def plan_split(cfg: ShardConfig, tbl: pa.Table, meta: dict, split: str) -> tuple[list[ShardSpec], dict[str, int]]:
    """Deterministic shard plan of one split: the same index, options and seed → the same plan."""
    kept, skipped = ordered_rows(cfg, tbl, split)
    specs = _specs(cfg, kept, meta, split, unlabelled=False)
    rest = ordered_unlabelled(tbl, split, cfg.tasks, cfg.seed, cfg.unlabelled)
    return specs + _specs(cfg, rest, meta, split, unlabelled=True), skipped


def _specs(cfg: ShardConfig, kept: pa.Table, meta: dict, split: str, *, unlabelled: bool) -> list[ShardSpec]:
    records = records_from_table(kept, labels=not unlabelled).tobytes()
    row_ids = kept["row_id"].to_numpy()
    roots = [str(Path(r)) for r in meta["image_roots"]]
    check_image_paths(kept, len(roots), Path(cfg.index))
    paths = [f"{roots[r]}/{img}" for r, img in zip(kept["image_root"].to_pylist(), kept["image"].to_pylist(), strict=True)]
    per = cfg.options()["samples_per_shard"]
    opts = json.dumps(cfg.labelled_options(), sort_keys=True).encode()
    kind = b"unlabelled" if unlabelled else b""
    specs = []
    for number, lo in enumerate(range(0, len(kept), per)):
        hi = min(lo + per, len(kept))
        keys = [f"{int(r):010d}" for r in row_ids[lo:hi]]
        rec = records[lo * RECORD_SIZE:hi * RECORD_SIZE]
        h = hashlib.sha256(opts + kind + split.encode() + b"%d" % number + rec)
        h.update("\n".join(paths[lo:hi]).encode())
        specs.append(ShardSpec(split, number, str(cfg.out), keys, paths[lo:hi], rec, h.hexdigest(),
                               cfg.frame_size or DEFAULT_FRAME_SIZE, cfg.resize_off_size, unlabelled))
    return specs


# ---- writing -------------------------------------------------------------------------------


def _read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a fifo named 00010.jpg cannot hang us
    try:
        st = os.fstat(fd)  # one stat per frame, on the open file: no check-then-open race
        if not stat.S_ISREG(st.st_mode):  # a folder named 00010.jpg, a fifo...
            raise IsADirectoryError(errno.EISDIR, "not a regular file, cannot be a frame image", path)
        size = st.st_size
        data = os.read(fd, size)
        while len(data) < size:  # os.read may return short on some filesystems
            more = os.read(fd, size - len(data))
            if not more:
                break
            data += more
        return data
    finally:
        os.close(fd)





def _finished(spec: ShardSpec) -> dict | None:
    """The state record of ``spec`` if its tar/idx are complete and still match the plan."""
    if not (spec.tar.is_file() and spec.idx.is_file() and spec.state.is_file()):
        return None
    try:
        state = json.loads(spec.state.read_text())
    except ValueError:
        return None
    if state.get("plan") != spec.plan_digest or spec.tar.stat().st_size != state.get("bytes"):
        return None
    if sha256_file(spec.tar) != state.get("sha256"):
        return None
    return state


def write_shard(spec: ShardSpec) -> dict:
    """Write one shard (or keep it when already finished); returns its state record.

    (Over 60 lines on purpose: the per-sample loop is the hot path of ``affpipe shard`` — ~50k
    iterations per shard with local names and no calls it can avoid — and its crash-safety
    order — temporary files, fsync, index, state, tar last — must read as one sequence.)
    """
    if (state := _finished(spec)) is not None:
        return {**state, "reused": True}
    # An outdated tar goes first, so that no tar ever sits beside an index that is not its own.
    spec.tar.unlink(missing_ok=True)
    spec.state.unlink(missing_ok=True)
    tmp_tar = spec.tar.with_name(spec.tar.name + ".tmp")
    sha, buf, offset, lines = hashlib.sha256(), bytearray(), 0, []
    bad: list[dict[str, str]] = []
    resized = 0
    header, size_of, want = tar_header, jpeg_size, (spec.frame_size, spec.frame_size)  # locals: ~50k calls per shard
    try:
        with open(tmp_tar, "wb") as f:
            for i, (key, path) in enumerate(zip(spec.keys, spec.paths, strict=True)):
                try:
                    data = _read_file(path)
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"{path}: image of row_id {int(key)} is listed in the index but missing on "
                        "disk; restore it or rebuild the index (`affpipe index`)"
                    ) from None
                why = None
                if size_of(data) != want:  # the common case costs one header walk (~1 µs)
                    data, why = check_frame(data, path, spec.frame_size, spec.resize_off_size)
                if why is not None:
                    if why != "resized":
                        log.warning("%s: %s; skipped (counted in the manifest as bad_image)", path, why)
                        bad.append({"key": key, "image": path, "why": why})
                        continue
                    resized += 1
                jpg, lbl = key + ".jpg", key + ".lbl"
                size = len(data)
                buf += header(jpg, size)
                buf += data
                pad = -size % BLOCK
                buf += bytes(pad)
                jpg_off = offset + BLOCK
                offset += BLOCK + size + pad
                buf += header(lbl, RECORD_SIZE)
                buf += spec.records[i * RECORD_SIZE:(i + 1) * RECORD_SIZE]
                buf += bytes(BLOCK - RECORD_SIZE)
                lines.append(f"jpg {jpg_off} {size} {jpg} lbl {offset + BLOCK} {RECORD_SIZE} {lbl}\n")
                offset += 2 * BLOCK
                if len(buf) >= _FLUSH_BYTES:
                    f.write(buf)
                    sha.update(buf)
                    buf.clear()
            # End of archive as tarfile writes it: two zero blocks, padded to a whole record.
            end = tar_end_padding(offset)
            buf += bytes(end)
            offset += end
            f.write(buf)
            sha.update(buf)
            f.flush()
            os.fsync(f.fileno())
        state = {
            "file": f"{spec.split}/{spec.tar.name}",
            "index_file": f"{spec.split}/{spec.idx.name}",
            "samples": len(lines),
            "bytes": offset,
            "bad_images": bad,
            "resized": resized,
            "sha256": sha.hexdigest(),
            "plan": spec.plan_digest,
        }
        write_idx_lines(spec.idx, lines)
        atomic_write_text(spec.state, json.dumps(state, indent=1))
        os.replace(tmp_tar, spec.tar)  # last: from here on the shard counts as complete
        fsync_dir(spec.tar.parent)
    except BaseException as exc:
        tmp_tar.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:  # ENOSPC names no file
            raise OSError(exc.errno, f"{exc.strerror or exc} while writing shard {spec.name}", str(tmp_tar)) from exc
        raise
    return {**state, "reused": False}


def _prepare_dirs(out: Path, split: str, specs: list[ShardSpec]) -> None:
    """Create folders; remove our leftovers of killed runs and shards no longer in the plan."""
    (out / split).mkdir(parents=True, exist_ok=True)
    (out / ".state").mkdir(parents=True, exist_ok=True)
    remove_stale(out, split, {s.name for s in specs})


def write_shards(cfg: ShardConfig) -> dict:
    """Write the shards of ``cfg.splits``, resuming a killed run; returns the manifest."""
    out = Path(cfg.out)
    tbl, meta = load_table(cfg.index, cfg.table)
    inputs = {"index_fingerprint": fingerprint_of(tbl, meta, cfg.table), **cfg.options()}
    check_output_folder(out)
    check_inputs(out, inputs, cfg.overwrite)  # refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    (out / ".state").mkdir(exist_ok=True)  # marks the folder as ours before anything else is written
    with writer_lock(out):
        check_output_folder(out)  # again under the lock: another run may have finished meanwhile
        if check_inputs(out, inputs, cfg.overwrite):
            log.info("--overwrite: removed %d file(s) of `affpipe shard` from %s", remove_own(out), out)
        record_inputs(out, inputs)
        return _write_locked(cfg, out, tbl, meta)


def _write_locked(cfg: ShardConfig, out: Path, tbl: pa.Table, meta: dict) -> dict:
    # "manifest.json exists" means "every shard it lists is complete": drop it before touching any.
    remove_manifest(out)
    plans = {split: plan_split(cfg, tbl, meta, split) for split in cfg.splits}
    check_not_empty(cfg.index, cfg.tasks, {k: v[1] for k, v in plans.items() if not any(not s.unlabelled for s in v[0])})
    size = cfg.frame_size or common_frame_size([p for sp in plans.values() for s in sp[0] for p in s.paths])
    plans = {k: ([dataclasses.replace(s, frame_size=size) for s in v[0]], v[1]) for k, v in plans.items()}
    specs = [s for split in cfg.splits for s in plans[split][0]]
    for split in cfg.splits:
        _prepare_dirs(out, split, plans[split][0])
    total = sum(len(s.keys) for s in specs)
    log.info("writing %d samples into %d shards with %d workers", total, len(specs), cfg.workers)
    results: dict[tuple[str, str], dict] = {}
    with tqdm(total=total, unit="frame", desc="shard", unit_scale=True, disable=None) as bar:
        if cfg.workers == 1 or len(specs) <= 1:
            done_iter = map(_write_indexed, enumerate(specs))
            pool = None
        else:
            # spawn, not fork: the parent holds pyarrow's thread pools, which fork can deadlock.
            pool = mp.get_context("spawn").Pool(min(cfg.workers, len(specs)))
            done_iter = pool.imap_unordered(_write_indexed, enumerate(specs))
        try:
            for i, state in done_iter:
                results[(specs[i].split, specs[i].name)] = state
                bar.update(state["samples"])
        except BaseException:
            if pool is not None:  # workers stopped mid-shard leave their temporaries: none may stay
                pool.terminate()
                pool.join()
            for split in cfg.splits:
                remove_temporaries(out, split)
            raise
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    reused = sum(r["reused"] for r in results.values())
    if reused:
        log.info("kept %d finished shards from an earlier run", reused)
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "index": index_reference(cfg.index, out),
        "index_absolute": str(Path(cfg.index).resolve()),
        "index_fingerprint": fingerprint_of(tbl, meta, cfg.table),
        "table": cfg.table,
        "options": cfg.options(),
        "record_version": RECORD_VERSION,
        "splits": {},
    }
    for split in cfg.splits:
        info = _split_entry([results[(split, s.name)] for s in plans[split][0] if not s.unlabelled])
        info["skipped"] = {**recorded_skips(cfg.unlabelled, split, plans[split][1]), "bad_image": len(info["bad_images"])}
        info["frame_size"] = [size, size]
        unl = [results[(split, s.name)] for s in plans[split][0] if s.unlabelled]
        if cfg.unlabelled and split != "test":
            info["unlabelled"] = _split_entry(unl)
        info["counts"] = ({"labelled": 0, "unlabelled": info["samples"]} if split == "test" else  # no test label is kept
                          {"labelled": info["samples"], "unlabelled": info.get("unlabelled", {}).get("samples", 0)})
        manifest["splits"][split] = info
    manifest["fingerprint"] = shards_fingerprint(manifest)
    write_manifest(out, manifest)
    return manifest


def _split_entry(states: list[dict]) -> dict:
    """A manifest entry of shards (a split's labelled ones, or its unlabelled ones)."""
    shards = [{k: st[k] for k in ("file", "index_file", "samples", "bytes", "sha256")} for st in states]
    return {"shards": shards, "samples": sum(s["samples"] for s in shards), "bytes": sum(s["bytes"] for s in shards),
            "bad_images": [b for st in states for b in st.get("bad_images", [])],
            "resized": sum(st.get("resized", 0) for st in states)}


def _write_indexed(item: tuple[int, ShardSpec]) -> tuple[int, dict]:
    return item[0], write_shard(item[1])


__all__ = [
    "ShardConfig", "ShardSpec", "write_shards", "write_shard", "plan_split", "select_rows", "ordered_rows",
    "load_table",
]
