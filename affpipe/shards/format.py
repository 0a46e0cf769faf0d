"""The shard format, in one place: tar member layout, DALI ``.idx`` files, ``manifest.json``.

The only module that reads or writes ``manifest.json`` and ``.idx`` files or knows the tar
byte layout. A shard ``<split>/<split>-NNNNNN.tar`` holds, per sample, ``<key>.jpg`` (the
source JPEG bytes) then ``<key>.lbl`` (a 32-byte record, :mod:`affpipe.labels`) as ustar
members with fixed metadata; ``<split>-NNNNNN.idx`` beside it is DALI's ``wds2idx`` v1.2
index (``ext offset size name`` per member, one line per sample); ``manifest.json`` lists
every shard with its sample count, size and sha256.

A split's unlabelled frames (train/val crops without a label of the shards' tasks; written by
default since affpipe 0.4) sit in shards of their own, listed under ``splits.<split>.unlabelled``
(same entry layout); ``splits.<split>.counts`` holds ``{"labelled", "unlabelled"}``. A manifest
without them (affpipe 0.3, or ``--no-unlabelled``) holds no unlabelled frames: the key is
additive, so the schema version stays 1 and 0.3's readers still read the labelled shards
(``affpipe.shards.unlabelled`` reads them).
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from affpipe.io import atomic_write_text, clip, confined_path
from affpipe.labels import SPLITS

MANIFEST = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
IDX_VERSION = "v1.2"  # DALI's wds2idx index format
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE

# One sample's members in an index: {ext: (offset, size, member name)}.
IdxEntry = dict[str, tuple[int, int, str]]


# ---- tar ------------------------------------------------------------------------------------


def _header_template() -> tuple[bytes, int]:
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode, info.uid, info.gid = 0, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    buf = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    buf[0:100] = bytes(100)
    buf[124:136] = bytes(12)
    buf[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    return bytes(buf), sum(buf)


_TEMPLATE, _TEMPLATE_SUM = _header_template()


def tar_header(name: str, size: int) -> bytes:
    """The ustar header ``tarfile`` writes for a regular file with our fixed metadata.

    Built from a template because ``TarInfo.tobuf`` per member costs more than the rest of
    writing a small sample; the tests check both are byte-identical.
    """
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    h = bytearray(_TEMPLATE)
    h[0:len(raw)] = raw
    size_field = b"%011o\0" % size
    h[124:136] = size_field
    h[148:155] = b"%06o\0" % (_TEMPLATE_SUM + sum(raw) + sum(size_field))
    return bytes(h)


def tar_end_padding(offset: int) -> int:
    """Bytes of the end-of-archive marker after ``offset`` bytes, as ``tarfile`` writes it:
    two zero blocks, padded to a whole record."""
    end = 2 * BLOCK
    return end + (-(offset + end) % RECORD)


def parse_tar(buf) -> tuple[list[tuple[str, int, int]], str | None]:
    """Members ``(name, data_offset, size)`` of a ustar archive, and the first structural error."""
    members: list[tuple[str, int, int]] = []
    off, end = 0, len(buf)
    while True:
        if off + BLOCK > end:
            return members, f"truncated: no end-of-archive marker (stops at byte {end})"
        header = buf[off:off + BLOCK]
        if header == bytes(BLOCK):
            return members, None
        stored = header[148:156].split(b"\0", 1)[0].strip()
        actual = sum(header[:148]) + 8 * 32 + sum(header[156:])
        try:
            ok = int(stored, 8) == actual
        except ValueError:
            ok = False
        if not ok:
            return members, f"bad tar header checksum at byte {off}"
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return members, f"non-numeric size field {bytes(header[124:136])!r} in the tar header at byte {off}"
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[156:157] not in (b"0", b"\0"):
            return members, f"member {name!r} at byte {off} is not a regular file"
        if off + BLOCK + size > end:
            return members, f"truncated: member {name!r} at byte {off} needs {size} bytes, file ends at {end}"
        members.append((name, off + BLOCK, size))
        off += BLOCK + size + (-size % BLOCK)


# ---- .idx -----------------------------------------------------------------------------------


def idx_line(members: list[tuple[str, int, int]]) -> str:
    """One sample's line of a DALI index: ``ext offset size name`` per member."""
    parts = []
    for name, offset, size in members:
        ext = name[name.find(".") + 1:]
        parts.append(f"{ext} {offset} {size} {name}")
    return " ".join(parts) + "\n"


def idx_header(samples: int) -> str:
    """The first line of an index of ``samples`` samples."""
    return f"{IDX_VERSION} {samples}\n"


def read_idx_header(idx: Path) -> tuple[str, int]:
    """``(version, samples)`` from an index's first line."""
    with open(idx, "rb") as f:
        head = f.readline(256).decode("ascii", "replace").split()
    if len(head) != 2 or not head[0].startswith("v1.") or not head[1].isdigit():
        raise ValueError(f"{idx}:1: not a DALI webdataset index (expected '{IDX_VERSION} <samples>')")
    return head[0], int(head[1])


def parse_idx(idx: Path) -> list[IdxEntry]:
    """Every sample of an index: ``{ext: (offset, size, member name)}`` per sample (v1.0-v1.2)."""
    version, n = read_idx_header(idx)
    step = 4 if version >= "v1.2" else 3
    samples: list[IdxEntry] = []
    with open(idx, encoding="utf-8", errors="replace") as f:
        next(f)
        for lineno, line in enumerate(f, start=2):
            tok = line.split()
            if not tok:
                continue
            if len(tok) % step:
                raise ValueError(f"{idx}:{lineno}: malformed index line ({len(tok)} fields)")
            try:
                comp = {
                    tok[i]: (int(tok[i + 1]), int(tok[i + 2]), tok[i + 3] if step == 4 else f"#{len(samples)}.{tok[i]}")
                    for i in range(0, len(tok), step)
                }
            except ValueError:
                raise ValueError(f"{idx}:{lineno}: malformed index line (non-numeric offset/size)") from None
            if any(off < 0 or size < 0 for off, size, _ in comp.values()):
                raise ValueError(f"{idx}:{lineno}: malformed index line (negative offset/size)")
            samples.append(comp)
    if len(samples) != n:
        raise ValueError(f"{idx}:1: header says {n} samples, the index lists {len(samples)}")
    return samples


def idx_member_arrays(idx: Path, exts: tuple[str, ...] = ("jpg", "lbl")) -> dict[str, np.ndarray]:
    """``{ext: int64 [n, 2] (offset, size)}`` of every sample's members, ``(-1, 0)`` where a
    sample lacks one: ``parse_idx`` as arrays, for readers of millions of samples. The lines
    affpipe writes (each sample's ``exts`` in that order) are read as one token array (~10x
    faster than per-line dicts); any other index goes through ``parse_idx`` and its errors."""
    version, n = read_idx_header(idx)
    with open(idx, encoding="utf-8", errors="replace") as f:
        next(f)
        tok = np.array(f.read().split())
    width = 4 * len(exts)
    if version >= "v1.2" and len(tok) == n * width:
        tok = tok.reshape(n, width)
        if all((tok[:, 4 * i] == ext).all() for i, ext in enumerate(exts)):
            try:
                out = {ext: tok[:, 4 * i + 1:4 * i + 3].astype(np.int64) for i, ext in enumerate(exts)}
            except ValueError:
                out = None  # non-numeric: parse_idx names the line
            if out is not None and all((a >= 0).all() for a in out.values()):
                return out
    comps = parse_idx(idx)
    missing = (-1, 0, "")
    return {ext: np.array([c.get(ext, missing)[:2] for c in comps], np.int64).reshape(-1, 2) for ext in exts}


def idx_last_end(idx: Path) -> int:
    """The byte where the index's last member ends (read from the file's tail only)."""
    version, n = read_idx_header(idx)
    if not n:
        return 0
    with open(idx, "rb") as f:
        f.seek(max(0, idx.stat().st_size - 65536))
        tail = f.read().decode("utf-8", "replace").strip().splitlines()
    tok = tail[-1].split() if tail else []
    step = 4 if version >= "v1.2" else 3  # the rule parse_idx follows
    try:
        return max(int(tok[i + 1]) + int(tok[i + 2]) for i in range(0, len(tok), step))
    except (ValueError, IndexError):
        raise ValueError(f"{idx}: malformed last line {tail[-1][:200] if tail else ''!r}") from None


def write_idx_lines(path: Path, lines: list[str]) -> None:
    """An index with header + the given sample lines (each ending in a newline), atomically."""
    atomic_write_text(path, idx_header(len(lines)) + "".join(lines))


def sample_key(comp: IdxEntry) -> str:
    """The sample's key (member name without extension)."""
    name = next(iter(comp.values()))[2]
    return name.split(".", 1)[0].rsplit("/", 1)[-1]


# ---- manifest.json --------------------------------------------------------------------------


def write_manifest(out: Path, manifest: dict) -> None:
    """Write ``out/manifest.json`` atomically (written last: it means "every shard is whole")."""
    atomic_write_text(Path(out) / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def remove_manifest(out: Path) -> None:
    """Drop ``out/manifest.json`` before any shard is touched."""
    (Path(out) / MANIFEST).unlink(missing_ok=True)


def read_manifest(out: Path, *, full: bool = True) -> dict:
    """``out/manifest.json``, checked: valid JSON, schema version, the keys and types readers use
    (``full``: every key ``verify`` uses; else the shard list only) and shard paths that are
    relative and stay inside ``out`` (a crafted manifest opens nothing else)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        what = "no such folder" if not Path(out).exists() else "no manifest"
        raise FileNotFoundError(f"{path}: {what}; write shards with `affpipe shard` first")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a manifest (not UTF-8 text at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}:1: expected a JSON object")
    if manifest.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise ValueError(
            f"{path}:1: manifest schema_version {clip(manifest.get('schema_version'))} != "
            f"{MANIFEST_SCHEMA_VERSION}; reshard with this affpipe version"
        )
    check_manifest(manifest, path, full=full)
    return manifest


def _field(obj: Any, key: str, kind: type, path: Path, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{path}: missing key {where}{key}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ValueError(f"{path}: {where}{key} must be {kind.__name__}, got {clip(json.dumps(value))}")
    if kind is int and value < 0:
        raise ValueError(f"{path}: {where}{key} must be >= 0, got {value}")
    return value


def check_manifest(manifest: dict, path: Path, *, full: bool = True) -> None:
    """The keys readers use, with their types; shard paths confined to the manifest's folder."""
    out = Path(path).parent
    splits = _field(manifest, "splits", dict, path, "")
    for split, info in splits.items():
        where = f"splits.{split}."
        if split not in SPLITS:
            raise ValueError(f"{path}: unknown split {clip(split)} (expected one of {SPLITS})")
        _check_entries(info, path, where, out, split)
        if isinstance(info, dict) and "unlabelled" in info:
            _check_entries(info["unlabelled"], path, where + "unlabelled.", out, split, unlabelled=True)
    if full:
        _check_full(manifest, path)


def _check_entries(info: Any, path: Path, where: str, out: Path, split: str, *, unlabelled: bool = False) -> None:
    """One list of shard entries (a split's ``shards``, or its ``unlabelled.shards``)."""
    stem = f"{split}-unlabelled" if unlabelled else split
    for i, entry in enumerate(_field(info, "shards", list, path, where)):
        at = f"{where}shards[{i}]."
        for key, kind in (("file", str), ("index_file", str), ("samples", int)):
            _field(entry, key, kind, path, at)
        for key, ext in (("file", "tar"), ("index_file", "idx")):
            confined_path(out, entry[key], f"{path}: {at}{key}")
            # a shard's split is its folder and name: one listed under another split (val shards
            # under train) would be trained on as training
            if re.fullmatch(rf"{re.escape(split)}/{re.escape(stem)}-\d{{6}}\.{ext}", entry[key]) is None:
                raise ValueError(f"{path}: {at}{key}: {clip(entry[key])} is not a {split} shard's name "
                                 f"({split}/{stem}-NNNNNN.{ext}); a shard of another split is never read as {split}")


def _check_full(manifest: dict, path: Path) -> None:
    _field(manifest, "index", str, path, "")
    table = _field(manifest, "table", str, path, "")
    if table not in ("frames", "mtl"):
        raise ValueError(f"{path}: table must be 'frames' or 'mtl', got {clip(table)}")
    opts = _field(manifest, "options", dict, path, "")
    for key, kind in (("split", str), ("tasks", list), ("samples_per_shard", int), ("seed", int)):
        _field(opts, key, kind, path, "options.")
    if opts["samples_per_shard"] < 1:
        raise ValueError(f"{path}: options.samples_per_shard must be >= 1")
    for split, info in manifest["splits"].items():
        where = f"splits.{split}."
        for key in ("samples", "bytes"):
            _field(info, key, int, path, where)
        _field(info, "skipped", dict, path, where)
        for i, entry in enumerate(info["shards"]):
            for key, kind in (("bytes", int), ("sha256", str)):
                _field(entry, key, kind, path, f"{where}shards[{i}].")


def index_reference(index: Path, out: Path) -> str:
    """How a manifest names its label index: by the one path rule of every artifact
    (:func:`affpipe.lineage.rel_path`: relative when near, so the pair moves together; else absolute)."""
    from affpipe.lineage import rel_path

    return rel_path(out, index)


def manifest_index(out: Path, manifest: dict | None = None, override: Path | None = None) -> Path:
    """The label index of the shards in ``out``: ``override`` (``--index``), else the manifest's
    ``index`` (relative to ``out`` unless absolute), else where it was when the shards were
    written (``index_absolute``: a shard folder copied alone). ``FileNotFoundError`` suggests
    ``--index``."""
    if override is not None:
        candidates = [Path(override)]
    else:
        manifest = read_manifest(out, full=False) if manifest is None else manifest
        if not isinstance(manifest.get("index"), str):
            raise ValueError(f"{Path(out) / MANIFEST}: no 'index' key (shards not written by `affpipe shard`)")
        candidates = [Path(out) / manifest["index"]]  # an absolute "index" replaces out
        if isinstance(manifest.get("index_absolute"), str):
            candidates.append(Path(manifest["index_absolute"]))
    for index in candidates:
        if (index / "index.json").is_file() or (index.is_file() and index.name == "index.json"):
            return index
    raise FileNotFoundError(
        f"{Path(out) / MANIFEST}: its label index is not at {' or '.join(map(str, candidates))} "
        "(moved?); pass --index DIR to point at it"
    )


def shards_fingerprint(manifest: dict) -> str:
    """The shards' lineage fingerprint: their index's fingerprint and every shard's sha256 (what
    feature tables and runs record of the shards they were made from)."""
    from affpipe.lineage import fingerprint

    shas = {split: [s.get("sha256") for s in info.get("shards", [])]
            for split, info in sorted((manifest.get("splits") or {}).items())}
    return fingerprint({"index": manifest.get("index_fingerprint"), "shards": shas})


def checked_index(out: Path, manifest: dict | None = None, override: Path | None = None) -> Path:
    """:func:`manifest_index`, checked against the index fingerprint the manifest records: an
    index moved or passed with ``--index`` must be the one the shards were written from (one
    error naming both; shards from before fingerprints are not checked)."""
    from affpipe.index.build import index_fingerprint
    from affpipe.lineage import check

    manifest = read_manifest(out, full=False) if manifest is None else manifest
    index = manifest_index(out, manifest, override)
    recorded = manifest.get("index_fingerprint")
    if isinstance(recorded, str):
        check("the index", recorded, index_fingerprint(index, manifest.get("table", "frames")),
              f"the shards {Path(out)}", f"the index {index}")
    return index


@dataclass(frozen=True)
class ShardLabels:
    """The label table a shard folder's row ids refer to, read once: where its index is, which
    table (``frames`` or ``mtl``), the rows, and the index's fingerprint (checked against the
    one the manifest records)."""

    index: Path
    table_name: str
    table: Any  # pa.Table
    fingerprint: str
    manifest: dict


def shard_labels(out: Path, manifest: dict | None = None, override: Path | None = None) -> ShardLabels:
    """The one way to open the label table of the shards in ``out`` (``override``: ``--index``):
    :func:`manifest_index` resolves it, ``frames.parquet`` is read once, and its fingerprint must
    be the one the manifest records (one error naming both)."""
    from affpipe.index.build import fingerprint_of, load_index
    from affpipe.lineage import check

    manifest = read_manifest(out, full=False) if manifest is None else manifest
    index = manifest_index(out, manifest, override)
    name = manifest.get("table", "frames")
    table, meta = load_index(index, table=name)
    actual = fingerprint_of(table, meta, name)
    recorded = manifest.get("index_fingerprint")
    if isinstance(recorded, str):
        check("the index", recorded, actual, f"the shards {Path(out)}", f"the index {index}")
    return ShardLabels(index, name, table, actual, manifest)


def shard_paths(out: Path, split: str, manifest: dict | None = None) -> list[tuple[Path, Path]]:
    """``(tar, idx)`` path pairs of ``split``, in manifest order (confined to ``out``)."""
    manifest = read_manifest(out, full=False) if manifest is None else manifest
    if split not in manifest["splits"]:
        raise ValueError(f"{Path(out) / MANIFEST}: no split {split!r} (has {sorted(manifest['splits'])})")
    return [(Path(out) / s["file"], Path(out) / s["index_file"]) for s in manifest["splits"][split]["shards"]]


def split_frame_size(out: Path, split: str) -> tuple[int, int] | None:
    """``(height, width)`` of the split's frames as ``affpipe shard`` recorded them, or None
    (no manifest, or one from before frame sizes were recorded)."""
    if not (Path(out) / MANIFEST).is_file():
        return None
    size = read_manifest(out, full=False)["splits"].get(split, {}).get("frame_size")
    ok = isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    return (size[0], size[1]) if ok else None


def index_tar(tar: Path, idx: Path) -> int:
    """Write the DALI ``.idx`` of any WebDataset tar, as ``wds2idx`` does (ustar, GNU or PAX
    members, read with ``tarfile``): regular members grouped into samples by key (the name up to
    its first dot). Returns the sample count."""
    lines: list[str] = []
    group: list[tuple[str, int, int]] = []
    try:
        with tarfile.open(tar, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key = m.name.split(".", 1)[0]
                if group and group[0][0].split(".", 1)[0] != key:
                    lines.append(idx_line(group))
                    group = []
                group.append((m.name, m.offset_data, m.size))
    except tarfile.TarError as exc:
        raise ValueError(f"{tar}: not a readable tar ({exc})") from None
    if group:
        lines.append(idx_line(group))
    write_idx_lines(Path(idx), lines)
    return len(lines)

