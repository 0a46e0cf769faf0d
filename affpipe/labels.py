"""Label vocabulary, the label-table schema, and the fixed-size label record stored in shards.

Everything that two stages must agree on about labels lives here: the class and AU names, the
invalid markers of the annotation files, the Arrow schema of ``frames.parquet`` and the binary
layout of a shard sample's ``.lbl`` member. Change the record layout only together with
``RECORD_VERSION``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

TABLE_SCHEMA_VERSION = 1

EXPR_CLASSES: tuple[str, ...] = (
    "Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other",
)
AU_NAMES: tuple[str, ...] = (
    "AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25", "AU26",
)
VA_NAMES: tuple[str, ...] = ("valence", "arousal")
NUM_EXPR = len(EXPR_CLASSES)
NUM_AU = len(AU_NAMES)
TASKS: tuple[str, ...] = ("va", "expr", "au")

# The header columns of each ABAW edition's annotation and submission files (ABAW3 onward use
# abaw3's): the one table synth writes and predict follows.
ABAW1_AUS: tuple[str, ...] = ("AU1", "AU2", "AU4", "AU6", "AU12", "AU15", "AU20", "AU25")
EDITION_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "abaw1": {"va": VA_NAMES, "expr": EXPR_CLASSES[:7], "au": ABAW1_AUS},
    "abaw2": {"va": VA_NAMES, "expr": EXPR_CLASSES[:7], "au": AU_NAMES},
    "abaw3": {"va": VA_NAMES, "expr": EXPR_CLASSES, "au": AU_NAMES},
}
EDITIONS: tuple[str, ...] = tuple(EDITION_COLUMNS)
MTL_HEADER = "image,valence,arousal,expression,aus"  # the MTL files' header (s-Aff-Wild2)


def edition_header(task: str, edition: str = "abaw3") -> str:
    """The header line of ``task``'s (va | expr | au) files in ``edition`` (abaw1 | abaw2 | abaw3)."""
    if edition not in EDITION_COLUMNS:
        raise ValueError(f"edition must be one of {EDITIONS}, got {edition!r}")
    return ",".join(EDITION_COLUMNS[edition][task])


# Invalid markers as written in the annotation files.
VA_INVALID = -5.0
EXPR_INVALID = -1  # (and AU: -1 in every column of a row)
AU_INVALID = -1

SPLITS: tuple[str, ...] = ("train", "val", "test")
LABELLED_SPLITS: tuple[str, ...] = ("train", "val")  # test labels are never shown to a model

FRAMES_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("video", pa.string()),
        ("frame", pa.int32()),
        ("split", pa.string()),
        ("image", pa.string()),  # relative to roots[image_root]; null when missing
        ("image_root", pa.int16()),  # index into index.json "image_roots"; -1 when missing
        ("has_image", pa.bool_()),
        ("valence", pa.float32()),  # NaN when invalid
        ("arousal", pa.float32()),
        ("va_valid", pa.bool_()),
        ("expr", pa.int8()),  # -1 when invalid
        ("expr_valid", pa.bool_()),
        *[(name, pa.int8()) for name in AU_NAMES],  # -1 when invalid / absent
        ("au_valid", pa.bool_()),  # at least one AU of the row is valid
    ]
)

# --- the .lbl record ------------------------------------------------------------------------
# 32 bytes, little-endian, row_id first so it is 8-byte aligned when records are stacked.
#   0  row_id   int64
#   8  valence  float32 (NaN when invalid)
#  12  arousal  float32
#  16  au[12]   int8 (0/1, -1 invalid)
#  28  expr     int8 (-1 invalid)
#  29  flags    uint8 (bit0 va_valid, bit1 expr_valid, bit2 au_valid)
#  30  version  uint8 (= RECORD_VERSION)
#  31  pad
RECORD_VERSION = 1
RECORD_SIZE = 32
FLAG_VA, FLAG_EXPR, FLAG_AU = 1, 2, 4
RECORD_DTYPE = np.dtype(
    {
        "names": ["row_id", "valence", "arousal", "au", "expr", "flags", "version"],
        "formats": ["<i8", "<f4", "<f4", ("i1", (NUM_AU,)), "i1", "u1", "u1"],
        "offsets": [0, 8, 12, 16, 28, 29, 30],
        "itemsize": RECORD_SIZE,
    }
)


def encode_records(
    row_id: np.ndarray,
    valence: np.ndarray,
    arousal: np.ndarray,
    expr: np.ndarray,
    au: np.ndarray,
    va_valid: np.ndarray,
    expr_valid: np.ndarray,
    au_valid: np.ndarray,
) -> np.ndarray:
    """Pack N label rows into an ``[N]`` array of ``RECORD_DTYPE`` (``.tobytes()`` per row)."""
    n = len(row_id)
    rec = np.zeros(n, dtype=RECORD_DTYPE)
    rec["row_id"] = row_id
    rec["valence"] = np.where(va_valid, valence, np.nan)
    rec["arousal"] = np.where(va_valid, arousal, np.nan)
    rec["au"] = np.where(np.asarray(au_valid, bool)[:, None], au, AU_INVALID)  # a masked row has no AU
    rec["expr"] = np.where(expr_valid, expr, EXPR_INVALID)
    rec["flags"] = (
        np.asarray(va_valid, np.uint8) * FLAG_VA
        | np.asarray(expr_valid, np.uint8) * FLAG_EXPR
        | np.asarray(au_valid, np.uint8) * FLAG_AU
    )
    rec["version"] = RECORD_VERSION
    return rec


def decode_records(raw: np.ndarray | bytes) -> np.ndarray:
    """View raw bytes (``[N*32]`` or ``[N, 32]`` uint8) as ``[N]`` records; checks the version."""
    buf = np.ascontiguousarray(np.frombuffer(raw, np.uint8) if isinstance(raw, bytes) else raw)
    if buf.size % RECORD_SIZE:
        raise ValueError(f"label record buffer of {buf.size} bytes is not a multiple of {RECORD_SIZE}")
    rec = buf.reshape(-1).view(RECORD_DTYPE)
    bad = rec["version"] != RECORD_VERSION
    if bad.any():
        raise ValueError(
            f"label record version {int(rec['version'][bad][0])} != {RECORD_VERSION} "
            f"(row_id {int(rec['row_id'][bad][0])}); reshard with this affpipe version"
        )
    return rec


def records_from_table(table: pa.Table, *, labels: bool = True) -> np.ndarray:
    """Records for every row of a label table (``FRAMES_SCHEMA`` columns).

    A ``test`` row's record carries no label (every mask false), whatever the table holds:
    a video a test list names may be annotated for another task, and a test frame must never
    train or score a model. ``labels=False``: no row's record carries a label (the records of
    the unlabelled shards, which pre-training reads: a frame outside the chosen tasks may hold
    another task's label, and it must not reach a head through them).
    """
    col = lambda name: table.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    au = np.stack([col(a) for a in AU_NAMES], axis=1).astype(np.int8) if len(table) else np.zeros((0, NUM_AU), np.int8)
    keep = col("split") != "test" if len(table) else np.zeros(0, bool)
    if not labels:
        keep = np.zeros(len(table), bool)
    return encode_records(
        col("row_id"), col("valence"), col("arousal"), col("expr"), au,
        col("va_valid") & keep, col("expr_valid") & keep, col("au_valid") & keep,
    )


# Frame numbers beyond this are not frames of a video (Aff-Wild2's longest has ~47k): a stray
# file name must not make the index allocate billions of rows.
MAX_FRAME = 10_000_000


def record_problems(raw: np.ndarray) -> list[tuple[int, str]]:
    """``(position, why)`` of every ``.lbl`` record in ``raw`` (``[N, 32]`` uint8) whose values
    are out of range: an unmasked expression must be 0..7, unmasked AUs 0, 1 or -1, unmasked VA
    finite in [-1, 1]; no unknown flag bit; this ``RECORD_VERSION``. Vectorized: the loaders
    call it on every batch."""
    rec = np.ascontiguousarray(raw, np.uint8).reshape(-1).view(RECORD_DTYPE)
    flags = rec["flags"]
    va = np.stack([rec["valence"], rec["arousal"]], axis=1)
    # A masked value is never read, so only the values a mask lets through are checked.
    va_flag, expr_flag, au_flag = (flags & FLAG_VA) > 0, (flags & FLAG_EXPR) > 0, (flags & FLAG_AU) > 0
    with np.errstate(invalid="ignore"):
        va_ok = ~va_flag | (np.abs(va) <= 1.0).all(axis=1)  # NaN fails the comparison
    expr = rec["expr"].astype(np.int16)
    expr_ok = ~expr_flag | ((expr >= 0) & (expr < NUM_EXPR))
    au = rec["au"]
    au_ok = ~au_flag | ((au >= -1) & (au <= 1)).all(axis=1)
    checks = (
        (rec["version"] == RECORD_VERSION, "record version"),
        ((flags & ~np.uint8(FLAG_VA | FLAG_EXPR | FLAG_AU)) == 0, "flags"),
        (va_ok, "valence/arousal"),
        (expr_ok, "expression"),
        (au_ok, "AU"),
    )
    bad = np.zeros(len(rec), bool)
    for ok, _ in checks:
        bad |= ~ok
    out = []
    for i in np.flatnonzero(bad).tolist():
        r = rec[i]
        whys = [name for ok, name in checks if not ok[i]]
        out.append((i, f"label record out of range ({', '.join(whys)}: row_id {int(r['row_id'])}, "
                       f"valence {float(r['valence']):.3g}, arousal {float(r['arousal']):.3g}, "
                       f"expr {int(r['expr'])}, AU {r['au'].tolist()}, flags {int(r['flags'])})"))
    return out
