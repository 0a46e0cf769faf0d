"""Input checks at shard time: image paths, empty splits, and frames.

Image paths from the label table stay under their image root. A split whose rows all lack an
image is an error (a wrong ``--images``), not an empty dataset. Every stored frame is a JPEG
of the shards' one frame size.

A zero-byte or non-JPEG file is skipped and counted (``bad_image``), never stored for the
loaders to choke on; a frame of another size is refused, naming it, unless the user asks to
resize such frames on purpose (then it is re-encoded and counted as ``resized``). The size is
read from the JPEG's start-of-frame header, so checking costs no decode.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from affpipe.io import clip

log = logging.getLogger(__name__)

DEFAULT_FRAME_SIZE = 112  # Aff-Wild2's cropped-aligned faces
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT/JPG/DAC)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG's start-of-frame segment, without decoding; ``None``
    when ``data`` is not a JPEG (empty, cut before the frame header, another format)."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _SOF:
            return (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
        elif marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length field
            i += 2
        else:
            i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def common_frame_size(paths: list[str], n: int = 32) -> int:
    """The side of the square frames most of ``n`` evenly spaced sample frames have
    (``DEFAULT_FRAME_SIZE`` when none is readable): the size every frame must have."""
    sizes: Counter = Counter()
    picks = sorted({int(k) for k in np.linspace(0, len(paths) - 1, min(n, len(paths)))}) if paths else []
    for i in picks:
        try:
            with open(paths[i], "rb") as f:
                dims = jpeg_size(f.read(1 << 16))  # the frame header sits in the first bytes
        except OSError:
            continue
        if dims is not None and dims[0] == dims[1]:
            sizes[dims[0]] += 1
    return sizes.most_common(1)[0][0] if sizes else DEFAULT_FRAME_SIZE


def check_frame(data: bytes, path: str, size: int, resize: bool) -> tuple[bytes, str | None]:
    """``(data, None)`` for a good frame; ``(b"", why)`` for one to skip and count;
    ``(re-encoded bytes, "resized")`` for an off-size frame when ``resize``."""
    dims = jpeg_size(data)
    if dims is None:
        return b"", "empty file" if not data else "not a JPEG (no start-of-frame header)"
    if dims == (size, size):
        return data, None
    if not resize:
        raise ValueError(f"{path}: frame is {dims[1]}x{dims[0]}, the shards hold {size}x{size} frames; "
                         f"fix or remove it, or pass --resize-off-size to resize such frames on purpose")
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return b"", "undecodable JPEG"
    _, enc = cv2.imencode(".jpg", cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA),
                          [cv2.IMWRITE_JPEG_QUALITY, 95])
    return enc.tobytes(), "resized"


def check_image_paths(kept: pa.Table, n_roots: int, index: Path) -> None:
    """Image paths from the label table become file paths only when they stay under their root:
    relative, no ``..``, no backslash or NUL, a root the index lists (one vectorized pass)."""
    hostile = pc.match_substring_regex(kept["image"], r"^/|(^|/)\.\.(/|$)|\\|\x00")
    root = kept["image_root"].to_numpy(zero_copy_only=False)
    bad = hostile.to_numpy(zero_copy_only=False) | (root < 0) | (root >= n_roots)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{index}: row_id {kept['row_id'][i].as_py()}: image {clip(kept['image'][i].as_py())} under root "
            f"{int(root[i])} is not a relative path inside one of the {n_roots} image roots; rebuild the index"
        )


def check_not_empty(index: Path, tasks: tuple[str, ...], empty: dict[str, dict[str, int]]) -> None:
    """``empty``: skip counts of the splits that give no sample. Rows that all lack an image (or
    a label) mean a wrong ``--images`` or ``--tasks``, not data; a split with no rows is noted."""
    for split, skipped in empty.items():
        if sum(skipped.values()):
            raise ValueError(
                f"{index}: split {split!r} gives 0 samples: of its {sum(skipped.values())} rows, "
                f"{skipped['no_image']} have no image and {skipped['no_label']} no label of tasks "
                f"{','.join(tasks)}; was the index built with the right image folder (--images)?"
            )
        log.warning("split %r has no rows in %s; it gets no shards", split, index)
