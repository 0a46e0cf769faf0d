"""Lineage: what an artifact was made from, recorded by its writer and checked by its readers.

Every artifact records fingerprints of its inputs (an index: its frame table's identity and
labels; shards: the index's; a feature table: the index's, the shards', the source checkpoint's
sha256, backbone, image size, width, rows; a run: the data it trained on). A consumer compares
the recorded fingerprint with the one of the input it is paired with *now*; a mismatch is one
error naming both sides (:func:`check`), never a silent join.

Paths stored inside an artifact are relative to the artifact's folder (:func:`rel_path`), so an
artifact and its inputs moved together stay paired; :func:`resolve_path` reads them back (an
absolute path, as older artifacts stored, is used as it is).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from affpipe.io import jsonable

# The frame table columns a fingerprint covers: identity (which frame a row_id is) and labels.
IDENTITY_COLUMNS = ("row_id", "video", "frame", "split")


def fingerprint(value: Any) -> str:
    """Short stable hash (16 hex) of a JSON-able value (keys sorted)."""
    text = json.dumps(jsonable(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def table_fingerprint(table: pa.Table, columns: tuple[str, ...] | None = None) -> str:
    """Hash of ``columns`` (default: all) of a label table, row order included.

    Strings are hashed as (sorted distinct values, per-row code), numbers as their bytes, so the
    result depends on the values only, not on how pyarrow chunked or laid out the buffers.
    Vectorized: ~1 s for the full-scale table (2.9M rows).
    """
    h = hashlib.sha256()
    for name in columns or tuple(table.column_names):
        col = table.column(name).combine_chunks()
        h.update(f"{name}:{col.type}:{len(col)};".encode())
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            values = pc.unique(col.fill_null("\0null")).sort()
            h.update("\0".join(values.to_pylist()).encode("utf-8", "surrogateescape"))
            h.update(np.asarray(pc.index_in(col.fill_null("\0null"), value_set=values), np.int32).tobytes())
        else:
            arr = col.to_numpy(zero_copy_only=False)
            h.update(np.ascontiguousarray(arr).tobytes())
            if col.null_count:
                h.update(np.asarray(col.is_null()).tobytes())
    return h.hexdigest()[:16]


def check(what: str, recorded: str | None, actual: str | None, recorded_by: str, actual_by: str) -> None:
    """``ValueError`` naming both sides when ``recorded`` (by ``recorded_by``) differs from
    ``actual`` (of ``actual_by``); nothing when either side has no fingerprint (older artifacts)."""
    if recorded is not None and actual is not None and recorded != actual:
        raise ValueError(f"{recorded_by} was made from {what} {recorded}, but {actual_by} is {what} {actual}: "
                         "they do not belong together (rebuild the first from the second, or pass the one it "
                         "was made from)")


# How far up a stored relative path may climb: an artifact and its inputs side by side or in
# sibling trees (``runs/x`` → ``../../data/shards``) move together; farther apart, the path is
# stored absolute (moving one alone then still finds the other). The one rule for every artifact.
MAX_UP = 3


def rel_path(base: Path | str, path: Path | str) -> str:
    """``path`` relative to the folder ``base`` (POSIX, at most ``MAX_UP`` ``..``), for storing
    inside an artifact at ``base``; absolute when farther or no relative path exists (another drive)."""
    target = Path(path).resolve()
    try:
        rel = Path(os.path.relpath(target, Path(base).resolve()))
    except ValueError:
        return str(target)
    return rel.as_posix() if rel.parts.count("..") <= MAX_UP else str(target)


def resolve_path(base: Path | str, stored: str | Path) -> Path:
    """A path stored in the artifact at ``base``: relative ones are joined to ``base``."""
    p = Path(stored)
    return p if p.is_absolute() else Path(base) / p
