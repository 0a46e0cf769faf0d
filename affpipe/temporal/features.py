"""The feature table: one row per frame with an image, its frozen-backbone feature vector.

Format: an Arrow IPC *file* (``features.arrow``) holding ONE record batch with columns
``row_id`` int64, ``video`` string, ``frame`` int32, ``split`` string and ``feature``
``fixed_size_list<halffloat>[D]``, sorted by (video, frame); plus ``manifest.json``.

Why Arrow IPC and not Parquet: an IPC file is the in-memory layout on disk, so
``pa.memory_map`` + ``ipc.open_file`` gives the feature matrix as a numpy ``float16 [N, D]``
view of the mapped file without decoding or copying (Parquet always decodes into fresh
memory: 3 GB for the full-scale table). The OS pages in only what windows touch, and several
processes share one page cache. One record batch so the matrix is one contiguous buffer.

Writing at full scale without holding the matrix in memory: the sorted features are first
gathered into a ``np.memmap`` scratch file, which then becomes the single record batch
(``pa.py_buffer`` wraps the memmap without a copy; the IPC writer streams it to disk).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from affpipe.io import atomic_open, atomic_write_text, jsonable, writing

log = logging.getLogger(__name__)

TABLE_FILE = "features.arrow"
MANIFEST_FILE = "manifest.json"
PARTS_DIR = "parts"
SCRATCH_FILE = "features.scratch"  # the merge's memmap (removed once the table is written)
FEATURE_SCHEMA_VERSION = 1


def feature_schema(dim: int) -> pa.Schema:
    """The table's Arrow schema for feature width ``dim``."""
    return pa.schema([
        ("row_id", pa.int64()),
        ("video", pa.string()),
        ("frame", pa.int32()),
        ("split", pa.string()),
        ("feature", pa.list_(pa.float16(), dim)),
    ])


def sort_order(video: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Stable permutation sorting rows by (video, frame)."""
    codes = np.unique(np.asarray(video, dtype=object).astype(str), return_inverse=True)[1]
    return np.lexsort((np.asarray(frame), codes))


def _feature_array(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """``float16 [N, D]`` (contiguous, possibly a memmap) → FixedSizeList without copying."""
    n, dim = matrix.shape
    values = pa.Array.from_buffers(pa.float16(), n * dim, [None, pa.py_buffer(matrix)])
    return pa.FixedSizeListArray.from_arrays(values, dim)


def write_table(path: Path, *, row_id: np.ndarray, video: np.ndarray, frame: np.ndarray, split: np.ndarray,
                features: np.ndarray) -> Path:
    """Write rows already sorted by (video, frame) as one record batch, atomically (tmp + rename)."""
    features = np.ascontiguousarray(features, dtype=np.float16)
    if features.ndim != 2 or len(features) != len(row_id):
        raise ValueError(f"features must be [N, D] with N = {len(row_id)} rows, got {features.shape}")
    batch = pa.record_batch([
        pa.array(np.asarray(row_id, np.int64)), pa.array(np.asarray(video, dtype=object).astype(str).tolist(), pa.string()),
        pa.array(np.asarray(frame, np.int32)), pa.array(np.asarray(split, dtype=object).astype(str).tolist(), pa.string()),
        _feature_array(features),
    ], schema=feature_schema(features.shape[1]))
    _write_batch(Path(path), batch)
    return Path(path)


def _write_batch(path: Path, batch: pa.RecordBatch) -> None:
    with atomic_open(path, "wb") as fh, ipc.new_file(fh, batch.schema) as writer:
        writer.write_batch(batch)


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    """``folder/manifest.json`` (atomically)."""
    atomic_write_text(Path(folder) / MANIFEST_FILE, json.dumps(jsonable(dict(manifest)), indent=2, sort_keys=True) + "\n")


def read_manifest(folder: Path) -> dict[str, Any]:
    """The feature table's manifest; a clear error when ``folder`` is not a feature table."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST_FILE} — not a feature table (write one with `affpipe embed`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(manifest, dict) or manifest.get("schema_version") != FEATURE_SCHEMA_VERSION:
        raise ValueError(f"{path}: not a feature-table manifest of schema version {FEATURE_SCHEMA_VERSION}")
    return manifest


@dataclass(frozen=True)
class FeatureTable:
    """A memory-mapped feature table: numpy views, no copies of the feature matrix."""

    path: Path
    row_id: np.ndarray  # int64 [N]
    video: np.ndarray  # int32 [N] codes into ``videos``
    videos: tuple[str, ...]
    frame: np.ndarray  # int32 [N]
    split: np.ndarray  # object [N]
    features: np.ndarray  # float16 [N, D], a read-only view of the mapped file
    manifest: Mapping[str, Any]
    index: Path | None = None  # the label index the rows were checked against (open_features)
    label_table: pa.Table | None = None  # its rows (FRAMES_SCHEMA), as open_features read them

    def __len__(self) -> int:
        return int(len(self.row_id))

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def rows_of(self, split: str) -> np.ndarray:
        """Row positions of ``split`` (``"all"``: every row)."""
        if split == "all":
            return np.arange(len(self))
        return np.flatnonzero(self.split == split)


def _sorted_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted distinct strings, int64 code per row)`` by hashing (``dictionary_encode``), not
    by sorting 2.9M strings: 5x faster at full scale."""
    enc = column.combine_chunks().fill_null("").dictionary_encode()
    names = np.asarray(enc.dictionary.to_pylist(), dtype=object).astype(str)
    order = np.argsort(names, kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return names[order], rank[np.asarray(enc.indices, np.int64)]


def read_table(folder: Path) -> FeatureTable:
    """Open ``folder/features.arrow`` (+ manifest) memory-mapped; checks sortedness and width."""
    folder = Path(folder)
    path = folder / TABLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {TABLE_FILE} (write one with `affpipe embed`)")
    manifest = read_manifest(folder)
    try:
        table = ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: not an Arrow IPC file ({exc})") from exc
    feat = table.column("feature")
    if feat.num_chunks != 1:  # written by another tool: fall back to one copy
        log.warning("%s: %d record batches; combining them (copies the features)", path, feat.num_chunks)
        feat = feat.combine_chunks()
    else:
        feat = feat.chunk(0)
    dim = feat.type.list_size
    matrix = feat.values.to_numpy(zero_copy_only=True).reshape(-1, dim)
    if set(table.column_names) != set(feature_schema(dim).names):
        raise ValueError(f"{path}: columns {table.column_names}, expected {feature_schema(dim).names}")
    names, codes = _sorted_codes(table.column("video"))
    frame = table.column("frame").to_numpy().astype(np.int32)
    key = codes.astype(np.int64) << 32 | frame.astype(np.int64)
    if len(key) > 1 and not (np.diff(key) > 0).all():
        raise ValueError(f"{path}: rows are not sorted by (video, frame) without duplicates")
    return FeatureTable(path=path, row_id=table.column("row_id").to_numpy(), video=codes.astype(np.int32),
                        videos=tuple(names), frame=frame,
                        split=table.column("split").to_numpy(zero_copy_only=False).astype(object),
                        features=matrix, manifest=manifest)


# ---- lineage: what a table was made from, checked when it is opened --------------------------

LINEAGE_KEYS = ("index_fingerprint", "shards_fingerprint", "source_sha256", "backbone", "image_size",
                "feature_dim", "rows")
_CHUNK_ROWS = 1 << 14  # rows per step of the vectorized scans (16 MB steps: flat memory, cache-friendly)


def features_fingerprint(manifest: Mapping[str, Any]) -> str:
    """A feature table's lineage fingerprint (what runs record): the index's and the shards'
    fingerprints, the source checkpoint's sha256, backbone, image size, width and rows."""
    from affpipe.lineage import fingerprint

    return fingerprint({k: manifest.get(k) for k in LINEAGE_KEYS})


def manifest_index_path(folder: Path, manifest: Mapping[str, Any]) -> Path:
    """The label index a feature manifest names (relative to the table's folder, or absolute)."""
    from affpipe.lineage import resolve_path

    if not isinstance(manifest.get("index"), str):
        raise ValueError(f"{Path(folder) / MANIFEST_FILE}: no 'index' key (not written by `affpipe embed`)")
    return resolve_path(folder, manifest["index"])


def source_checkpoint(folder: Path, manifest: Mapping[str, Any]) -> Path | None:
    """The affpipe run checkpoint a table was embedded from (relative to the table's folder, or
    absolute), whose per-frame heads can start a temporal head's skip path; None when the table
    was embedded from a weight file (``embed --weights``) or published weights, which hold a
    backbone and no heads (``source_kind``; a table from before it: by its ``source``)."""
    from affpipe.lineage import resolve_path

    stored = manifest.get("source_checkpoint")
    if not (isinstance(stored, str) and stored) or source_kind(manifest) != "run":
        return None
    return resolve_path(folder, stored)


def source_kind(manifest: Mapping[str, Any]) -> str:
    """``"run"`` (an affpipe checkpoint), ``"weights"`` (a weight file) or ``"published"``."""
    kind = manifest.get("source_kind")
    if kind in ("run", "weights", "published"):
        return str(kind)
    source = str(manifest.get("source") or "")
    if source in ("imagenet", "pretrained"):
        return "published"
    return "weights" if source.endswith(".safetensors") else "run"


def nonfinite_rows(features: np.ndarray) -> np.ndarray:
    """Positions of the rows holding a NaN or an infinity, scanned in chunks over the (mapped)
    ``float16`` matrix: a half float is not finite exactly when its 5 exponent bits are all set."""
    bits = features.view(np.uint16) if features.dtype == np.float16 else None
    bad: list[np.ndarray] = []
    for s in range(0, len(features), _CHUNK_ROWS):
        if bits is not None:  # a row's max exponent: one and + one max, 3x faster than and + == + any
            hit = np.bitwise_and(bits[s:s + _CHUNK_ROWS], 0x7C00, dtype=np.uint16).max(axis=1) == 0x7C00
        else:
            hit = ~np.isfinite(features[s:s + _CHUNK_ROWS]).all(axis=1)
        if hit.any():
            bad.append(np.flatnonzero(hit) + s)
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


def _row_name(t: FeatureTable, i: int) -> str:
    return f"video {t.videos[t.video[i]]} frame {int(t.frame[i])} (row_id {int(t.row_id[i])})"


def check_table(t: FeatureTable) -> None:
    """The table against its own manifest: width, row count, finite features (one error each)."""
    m, path = t.manifest, t.path
    if isinstance(m.get("feature_dim"), int) and m["feature_dim"] != t.dim:
        raise ValueError(f"{path}: holds features of width {t.dim}, but {path.parent / MANIFEST_FILE} says "
                         f"{m['feature_dim']}; re-embed (`affpipe embed --overwrite`)")
    if isinstance(m.get("rows"), int) and m["rows"] != len(t):
        raise ValueError(f"{path}: holds {len(t)} rows, but {path.parent / MANIFEST_FILE} says {m['rows']} "
                         "(rows lost or added); re-embed (`affpipe embed --overwrite`)")
    bad = nonfinite_rows(t.features)
    if len(bad):
        videos = sorted({t.videos[c] for c in np.unique(t.video[bad])})
        more = ", ..." if len(videos) > 5 else ""
        raise ValueError(f"{path}: {len(bad)} rows hold non-finite features (NaN or inf), first {_row_name(t, int(bad[0]))}; "
                         f"videos {', '.join(videos[:5])}{more}; re-embed them (`affpipe embed --overwrite`)")


def check_rows(t: FeatureTable, label_table: pa.Table, index: Path) -> None:
    """Every row's ``row_id`` names the same (video, frame) in the label index (vectorized join)."""
    import pyarrow.compute as pc

    ids = label_table.column("row_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    pos = np.clip(np.searchsorted(ids[order], t.row_id), 0, max(len(ids) - 1, 0))
    take = order[pos] if len(ids) else pos
    found = ids[take] == t.row_id if len(ids) else np.zeros(len(t), bool)
    codes = np.asarray(pc.index_in(label_table.column("video"), value_set=pa.array(t.videos, pa.string()))
                       .fill_null(-1), np.int64)
    frames = label_table.column("frame").to_numpy()
    same = found & (codes[take] == t.video) & (frames[take] == t.frame) if len(ids) else found
    if same.all():
        _check_split(t, label_table, take, index)
    if not same.all():
        i = int(np.flatnonzero(~same)[0])
        there = (f"video {label_table.column('video')[int(take[i])]} frame {int(frames[take[i]])}" if found[i]
                 else "no row")
        raise ValueError(f"{t.path}: {int((~same).sum())} rows do not match the index {index} (first: "
                         f"{_row_name(t, i)} is {there} there); the index was rebuilt or is another one: "
                         "re-embed from shards of this index")


def _check_split(t: FeatureTable, label_table: pa.Table, take: np.ndarray, index: Path) -> None:
    """Every row's ``split`` is its frame's split in the index (consumers pick train and val rows
    by it: a validation video relabelled ``train`` would be scored, and trained on, as training)."""
    import pyarrow.compute as pc

    splits = pa.array(sorted(set(label_table.column("split").unique().to_pylist()) | {"train", "val", "test"}))
    want = np.asarray(pc.index_in(label_table.column("split"), value_set=splits).fill_null(-1), np.int64)[take]
    have = np.asarray(pc.index_in(pa.array(t.split, pa.string(), from_pandas=True), value_set=splits)
                      .fill_null(-1), np.int64)
    wrong = want != have
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        raise ValueError(f"{t.path}: {int(wrong.sum())} rows carry another split than in the index {index} (first: "
                         f"{_row_name(t, i)} is {t.split[i]!r} here, {splits[int(want[i])]} there); the table was "
                         "edited or the index rebuilt: re-embed from shards of this index")


def open_features(path: Path, *, index: Path | None = None) -> FeatureTable:
    """Open a feature table and check what it was made from, vectorized over the mapped file:
    width, rows and finiteness against its manifest; the label index (``index`` overrides the
    manifest's) against the index fingerprint it records (one error naming both); every
    ``row_id`` against (video, frame) of that index. Returns the table with ``index`` and
    ``label_table`` set."""
    import dataclasses

    from affpipe.index.build import fingerprint_of, load_index
    from affpipe.lineage import check

    t = read_table(path)
    check_table(t)
    where = manifest_index_path(path, t.manifest) if index is None else Path(index)
    table_name = t.manifest.get("table", "frames")
    label_table, meta = load_index(where, table=table_name)
    check("the index", t.manifest.get("index_fingerprint"), fingerprint_of(label_table, meta, table_name),
          f"the feature table {Path(path)}", f"the index {where}")
    check_rows(t, label_table, where)
    return dataclasses.replace(t, index=where, label_table=label_table)


# ---- parts: what `affpipe embed` writes per shard, merged once every shard is done ----------


def write_part(path: Path, row_id: np.ndarray, features: np.ndarray) -> Path:
    """One shard's features (``row_id`` + ``feature``, any order), atomically (tmp + rename)."""
    features = np.ascontiguousarray(features, dtype=np.float16)
    batch = pa.record_batch([pa.array(np.asarray(row_id, np.int64)), _feature_array(features)],
                            names=["row_id", "feature"])
    _write_batch(Path(path), batch)
    return Path(path)


def _read_part(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    feat = table.column("feature").combine_chunks()
    if len(table) == 0:
        return table.column("row_id").to_numpy(), np.zeros((0, feat.type.list_size), np.float16)
    return table.column("row_id").to_numpy(), feat.values.to_numpy(zero_copy_only=True).reshape(-1, feat.type.list_size)


Lookup = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _reserve(path: Path) -> None:
    """Allocate the whole (sparse) file now: a full disk is then an ``OSError`` here, not a
    SIGBUS in the middle of writing through the mapping, which would leave the file behind."""
    import errno
    import os

    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return  # the filesystem cannot reserve space: write as before
            raise


def merge_parts(parts: list[Path], out: Path, lookup: Lookup) -> int:
    """Merge part files into ``out/features.arrow`` sorted by (video, frame).

    ``lookup(row_id) -> (video, frame, split)`` arrays from the label table. The features are
    gathered into a memmap scratch file in final order, so memory stays flat at full scale.
    """
    metas = [_read_part(p)[0] for p in parts]
    row_id = np.concatenate(metas) if metas else np.zeros(0, np.int64)
    if len(np.unique(row_id)) != len(row_id):
        raise ValueError(f"{out}: the parts hold {len(row_id) - len(np.unique(row_id))} duplicate row ids")
    video, frame, split = lookup(row_id)
    order = sort_order(video, frame)
    dest = np.empty_like(order)
    dest[order] = np.arange(len(order))  # where each concatenated row lands
    if not parts:
        raise ValueError(f"{out}: no feature parts to merge")
    dim = _read_part(parts[0])[1].shape[1]
    scratch_path = Path(out) / SCRATCH_FILE
    try:  # the scratch is as large as the table (~3 GB at full scale): a failed merge never leaves it
        with writing(scratch_path):
            scratch = np.lib.format.open_memmap(scratch_path, mode="w+", dtype=np.float16, shape=(len(row_id), dim))
            _reserve(scratch_path)
            start = 0
            for p in parts:
                _, feats = _read_part(p)
                scratch[dest[start:start + len(feats)]] = feats
                start += len(feats)
            scratch.flush()
        bad = nonfinite_rows(scratch)
        if len(bad):  # refused here, before a table exists, not only when it is opened
            first = int(order[int(bad[0])])  # (scratch row i holds concatenated row order[i])
            raise ValueError(f"{out}: {len(bad)} of {len(row_id)} rows of features are NaN or infinite (first: "
                             f"video {video[first]} frame {int(frame[first])}, row_id {int(row_id[first])}); the "
                             "encoder's output is not finite (weights holding NaN, or an fp16 overflow: try "
                             "--amp none); no table written")
        write_table(Path(out) / TABLE_FILE, row_id=row_id[order], video=np.asarray(video)[order],
                    frame=np.asarray(frame)[order], split=np.asarray(split)[order], features=scratch)
        del scratch
    finally:
        scratch_path.unlink(missing_ok=True)
    return len(row_id)
