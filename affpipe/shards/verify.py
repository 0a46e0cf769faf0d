"""``affpipe verify``: re-read every shard and check it against its manifest and the label table.

Per shard: size and sha256 against the manifest; the tar structure (header checksums, members
paired as ``<key>.jpg`` + ``<key>.lbl``, nothing truncated); the ``.idx`` against the offsets
and sizes of the members as found in the tar; the keys against the shard plan recomputed from
the index (so every kept frame appears exactly once, in the planned order); every ``.lbl``
record byte for byte against its row of the label table; no zero-byte JPEG; with ``decode``
every JPEG decodes. Frames skipped while writing (``bad_images`` in the manifest) are left out of
the recomputed plan; a split that lost all its rows is a problem (a wrong ``--images``).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
from pathlib import Path

import numpy as np
from tqdm import tqdm

from affpipe.labels import AU_NAMES, RECORD_SIZE, decode_records, records_from_table
from affpipe.shards.format import (
    BLOCK,
    idx_header,
    idx_line,
    manifest_index,
    parse_tar,
    read_manifest,
)
from affpipe.shards.unlabelled import frame_counts, ordered_unlabelled, recorded_skips
from affpipe.shards.write import (
    ShardConfig,
    load_table,
    ordered_rows,
)

log = logging.getLogger(__name__)
MAX_PROBLEMS_PER_SHARD = 20



def _record_diff(got: np.void, want: np.void) -> str:
    diffs = []
    for field in ("row_id", "valence", "arousal", "expr", "flags", "version"):
        g, w = got[field], want[field]
        same = g == w or (field in ("valence", "arousal") and np.isnan(g) and np.isnan(w))
        if not same:
            diffs.append(f"{field} {g} != table {w}")
    for j, name in enumerate(AU_NAMES):
        if got["au"][j] != want["au"][j]:
            diffs.append(f"{name} {got['au'][j]} != table {want['au'][j]}")
    return ", ".join(diffs) or "bytes differ"


class _Checker:
    """Checks of one shard; collects problems prefixed with the shard's file name."""

    def __init__(self, out: Path, entry: dict, table_records: np.ndarray | None,
                 row_pos: tuple[np.ndarray, np.ndarray] | None, expected_keys: list[str] | None,
                 decode: bool) -> None:
        self.out, self.entry, self.decode = out, entry, decode
        self.table_records, self.row_pos, self.expected_keys = table_records, row_pos, expected_keys
        self.problems: list[str] = []
        self.keys: list[str] = []

    def add(self, msg: str) -> None:
        self.problems.append(f"{self.entry['file']}: {msg}")

    def run(self) -> list[str]:
        tar = self.out / self.entry["file"]
        if not tar.is_file():
            self.add("missing")
            return self.problems
        size = tar.stat().st_size
        if size != self.entry["bytes"]:
            self.add(f"size {size} != manifest {self.entry['bytes']}")
        if size == 0:
            if hashlib.sha256().hexdigest() != self.entry["sha256"]:
                self.add(f"sha256 of an empty file != manifest {self.entry['sha256']}")
            self.add("empty file")
            return self.problems
        with open(tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            # hashed from the same mapping the checks read: one pass over a ~340 MB shard, not two
            if (sha := hashlib.sha256(buf).hexdigest()) != self.entry["sha256"]:
                self.add(f"sha256 {sha} != manifest {self.entry['sha256']}")
            members, err = parse_tar(buf)
            if err:
                self.add(err)
            samples = self._pair(members)
            self._check_sizes(samples)
            self._check_idx(samples)
            self._check_labels(buf, samples)
            if self.decode:
                self._decode(buf, samples)
        return self.problems

    def _pair(self, members: list[tuple[str, int, int]]) -> list[tuple[str, tuple[str, int, int], tuple[str, int, int]]]:
        samples = []
        for i in range(0, len(members) - 1, 2):
            jpg, lbl = members[i], members[i + 1]
            key = jpg[0].rsplit(".", 1)[0]
            if jpg[0] != f"{key}.jpg" or lbl[0] != f"{key}.lbl":
                self.add(f"members {jpg[0]!r}, {lbl[0]!r} at byte {jpg[1] - BLOCK} are not a <key>.jpg + <key>.lbl pair")
                return samples
            samples.append((key, jpg, lbl))
        if len(members) % 2:
            self.add(f"odd member count {len(members)}: {members[-1][0]!r} has no pair")
        self.keys = [s[0] for s in samples]
        if len(samples) != self.entry["samples"]:
            self.add(f"{len(samples)} samples in the tar != manifest {self.entry['samples']}")
        if self.expected_keys is not None and self.keys != self.expected_keys:
            first = next((i for i, (a, b) in enumerate(zip(self.keys, self.expected_keys, strict=False)) if a != b),
                         min(len(self.keys), len(self.expected_keys)))
            got = self.keys[first] if first < len(self.keys) else "<end>"
            want = self.expected_keys[first] if first < len(self.expected_keys) else "<end>"
            self.add(f"sample {first}: key {got} != planned key {want} (shard plan from the index)")
        return samples

    def _check_idx(self, samples: list) -> None:
        idx = self.out / self.entry["index_file"]
        if not idx.is_file():
            self.add(f"index {self.entry['index_file']} missing")
            return
        lines = idx.read_bytes().decode("utf-8", "replace").splitlines(keepends=True)
        head = idx_header(self.entry["samples"])
        if not lines or lines[0] != head:
            self.add(f"{idx.name}: first line {lines[0] if lines else ''!r} != {head!r}")
        if len(lines) - 1 != len(samples):
            self.add(f"{idx.name}: {len(lines) - 1} entries != {len(samples)} samples in the tar")
        bad = 0
        for line, (key, jpg, lbl) in zip(lines[1:], samples, strict=False):
            want = idx_line([jpg, lbl])
            if line != want and bad < MAX_PROBLEMS_PER_SHARD:
                bad += 1
                self.add(f"{idx.name}: key {key}: entry {line.strip()!r} != tar members {want.strip()!r}")

    def _check_labels(self, buf: mmap.mmap, samples: list) -> None:
        if not samples:
            return
        bad_size = [key for key, _, (_, _, size) in samples if size != RECORD_SIZE]
        if bad_size:
            self.add(f"key {bad_size[0]}: .lbl is not {RECORD_SIZE} bytes ({len(bad_size)} such samples)")
            return
        raw = b"".join(buf[off:off + RECORD_SIZE] for _, _, (_, off, _) in samples)
        try:
            rec = decode_records(raw)
        except ValueError as exc:
            self.add(str(exc))
            return
        keys = np.array([int(k) for k, _, _ in samples], np.int64)
        wrong_id = np.nonzero(rec["row_id"] != keys)[0]
        for i in wrong_id[:MAX_PROBLEMS_PER_SHARD]:
            self.add(f"key {samples[i][0]}: .lbl row_id {int(rec['row_id'][i])} != key")
        if self.table_records is None or self.row_pos is None:
            return
        ids, pos = self.row_pos
        at = np.searchsorted(ids, keys).clip(0, max(len(ids) - 1, 0))
        found = (ids[at] == keys) if len(ids) else np.zeros(len(keys), bool)
        for i in np.nonzero(~found)[0][:MAX_PROBLEMS_PER_SHARD]:
            self.add(f"key {samples[i][0]}: row_id not in the label table")
        # Index the byte view, not the records: numpy's fancy indexing of a structured array
        # copies fields only and leaves the pad byte uninitialized.
        want_u8 = self.table_records.view(np.uint8).reshape(-1, RECORD_SIZE)[pos[at]]
        want = want_u8.reshape(-1).view(self.table_records.dtype)
        got_u8 = np.frombuffer(raw, np.uint8).reshape(-1, RECORD_SIZE)
        differ = np.nonzero(found & (got_u8 != want_u8).any(axis=1))[0]
        for i in differ[:MAX_PROBLEMS_PER_SHARD]:
            self.add(f"key {samples[i][0]}: label record differs from the table: {_record_diff(rec[i], want[i])}")
        if len(differ) > MAX_PROBLEMS_PER_SHARD:
            self.add(f"... {len(differ) - MAX_PROBLEMS_PER_SHARD} more label records differ")

    def _decode(self, buf: mmap.mmap, samples: list) -> None:
        import cv2

        bad = 0
        for key, (_, off, size), _ in samples:
            try:  # OpenCV raises on an empty buffer rather than returning None
                img = cv2.imdecode(np.frombuffer(buf, np.uint8, size, off), cv2.IMREAD_COLOR) if size else None
            except cv2.error:
                img = None
            if img is None and size and bad < MAX_PROBLEMS_PER_SHARD:
                bad += 1
                self.add(f"key {key}: the JPEG does not decode")

    def _check_sizes(self, samples: list) -> None:
        empty = [key for key, (_, _, size), _ in samples if size == 0]
        for key in empty[:MAX_PROBLEMS_PER_SHARD]:
            self.add(f"key {key}: empty .jpg (0 bytes)")


def _split_counts(split: str, info: dict, skipped: dict[str, int], planned: int, bad: set) -> list[str]:
    """The manifest's counts of ``split`` against the plan recomputed from the index."""
    problems = []
    recorded = {k: info["skipped"].get(k) for k in skipped}  # bad_image is found while writing
    if skipped != recorded:
        problems.append(f"{split}: skip counts {recorded} != recomputed from the index {skipped}")
    if len(bad) != info["skipped"].get("bad_image", 0):
        problems.append(f"{split}: {info['skipped'].get('bad_image', 0)} bad images counted, {len(bad)} listed")
    if planned - len(bad) != info["samples"]:
        problems.append(f"{split}: manifest has {info['samples']} samples, the index gives {planned}"
                        + (f" of which {len(bad)} were bad images" if bad else ""))
    return problems


def _check_unlabelled(out: Path, split: str, info: dict, tbl, cfg: ShardConfig | None, decode: bool,
                      seen: dict[str, str]) -> list[str]:
    """The split's unlabelled shards: the keys the index gives, records that carry no label."""
    entry = info.get("unlabelled")
    if entry is None:
        return []
    problems = []
    if sum(s["samples"] for s in entry["shards"]) != entry.get("samples"):
        problems.append(f"{split}: unlabelled shard sample counts do not add up to {entry.get('samples')}")
    expected = records = row_pos = None
    bad: set = set()
    if cfg is not None:
        rows = ordered_unlabelled(tbl, split, cfg.tasks, cfg.seed, cfg.unlabelled)
        expected = [f"{int(r):010d}" for r in rows["row_id"].to_numpy()]
        records = records_from_table(rows, labels=False)
        order = np.argsort(records["row_id"], kind="stable")
        row_pos = (records["row_id"][order], order)
        bad = {b.get("key") for b in entry.get("bad_images", []) if isinstance(b, dict)}
        if len(expected) - len(bad) != entry.get("samples"):
            problems.append(f"{split}: manifest has {entry.get('samples')} unlabelled samples, the index gives {len(expected)}")
    per = cfg.options()["samples_per_shard"] if cfg is not None else 0
    return problems + _check_shards(out, entry["shards"], (records, row_pos), expected, bad, per, decode, seen)


def _check_shards(out: Path, entries: list[dict], table: tuple, expected: list[str] | None, bad: set, per: int,
                  decode: bool, seen: dict[str, str], bar=None) -> list[str]:
    """Every shard of ``entries`` against its part of ``expected`` (``table``: the records the
    label table gives and their positions); a key in two shards is a problem too."""
    problems = []
    for number, entry in enumerate(entries):
        want = expected[number * per:(number + 1) * per] if expected is not None else None
        if want is not None and bad:  # frames skipped while writing (zero-byte, not a JPEG)
            want = [k for k in want if k not in bad]
        checker = _Checker(out, entry, *table, want, decode)
        problems += checker.run()
        for key in checker.keys:
            if key in seen:
                problems.append(f"{entry['file']}: key {key} also in {seen[key]}")
            seen[key] = entry["file"]
        if bar is not None:
            bar.update(entry["samples"])
    return problems


def verify_shards(out: Path, *, decode: bool = False, index: Path | None = None) -> list[str]:
    """Re-read every shard of ``out``; the problems found (empty when all is well).

    ``index`` overrides the label index recorded in the manifest (e.g. after moving it). When
    no index can be found the label and plan checks are reported as not done (a problem).
    """
    out = Path(out)
    manifest = read_manifest(out)
    problems: list[str] = []
    try:
        frame_counts(out, manifest)  # labelled / unlabelled counts against the shard entries
    except ValueError as exc:
        problems.append(str(exc))
    opts = manifest["options"]
    tbl = None
    try:
        index = manifest_index(out, manifest, index)
        tbl, _ = load_table(index, manifest["table"])
    except (FileNotFoundError, ValueError) as exc:
        problems.append(f"labels and shard plan not checked: {exc} (pass --index)")
    table_records = row_pos = None
    if tbl is not None:
        table_records = records_from_table(tbl)
        ids = table_records["row_id"]
        order = np.argsort(ids, kind="stable")
        row_pos = (ids[order], order)
        cfg = ShardConfig(index=index, out=out, split=opts["split"], table=manifest["table"],
                          tasks=tuple(opts["tasks"]), samples_per_shard=opts["samples_per_shard"],
                          seed=opts["seed"], frame_size=opts.get("frame_size"),
                          resize_off_size=bool(opts.get("resize_off_size", False)),
                          unlabelled=bool(opts.get("unlabelled", False)))
    if not manifest["splits"]:
        problems.append("the manifest lists no split")
    total = sum(s["samples"] for sp in manifest["splits"].values() for s in sp["shards"])
    with tqdm(total=total, unit="frame", desc="verify", unit_scale=True, disable=None) as bar:
        for split, info in manifest["splits"].items():
            expected, bad = None, {b.get("key") for b in info.get("bad_images", []) if isinstance(b, dict)}
            if tbl is not None:
                kept, skipped = ordered_rows(cfg, tbl, split)
                expected = [f"{int(r):010d}" for r in kept["row_id"].to_numpy()]
                problems += _split_counts(split, info, recorded_skips(cfg.unlabelled, split, skipped), len(expected), bad)
            if info["samples"] == 0 and sum(v for v in info["skipped"].values() if isinstance(v, int)):
                problems.append(f"{split}: 0 samples, all {sum(info['skipped'].values())} rows skipped "
                                f"({info['skipped']}); was the index built with the right --images?")
            if sum(s["samples"] for s in info["shards"]) != info["samples"]:
                problems.append(f"{split}: shard sample counts do not add up to {info['samples']}")
            per = opts["samples_per_shard"]
            seen: dict[str, str] = {}
            problems += _check_shards(out, info["shards"], (table_records, row_pos), expected, bad, per, decode,
                                      seen, bar)
            problems += _check_unlabelled(out, split, info, tbl, cfg if tbl is not None else None, decode, seen)
    if problems:
        log.warning("%d problems in %s", len(problems), out)
    return problems
