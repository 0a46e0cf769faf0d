"""What makes a sample bad, the same in both backends: an empty or undecodable JPEG, a frame
of another size than the split's, a label record out of range (:func:`affpipe.labels.record_problems`).
A bad sample raises naming shard and key, or is skipped and counted with ``on_bad="skip"``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from affpipe.shards.format import parse_idx

# What a bad-sample error tells the user to do: the flag (train, evaluate, predict), the recipe key.
SKIP_HINT = "pass --on-bad skip (loader.on_bad = \"skip\" in a recipe) to skip bad samples and count them"
DALI_SKIP_HINT = "the DALI backend cannot skip it: pass --backend torch --on-bad skip, or reshard"
_EMPTY_JPG = re.compile(rb"(?:^| )jpg \d+ 0(?= |$)", re.M)


def decode_jpeg(buf, size: int, offset: int, flags: int):
    """``cv2.imdecode`` of ``size`` bytes at ``offset`` of ``buf``; ``None`` for empty or
    undecodable data (OpenCV raises on an empty buffer instead of returning None)."""
    import cv2

    if size <= 0:
        return None
    try:
        return cv2.imdecode(np.frombuffer(buf, np.uint8, size, offset), flags)
    except cv2.error:
        return None


def bad_sample(where: str, img: np.ndarray | None, size: int, frame_size: tuple[int, int] | None) -> str | None:
    """Why a decoded frame cannot enter a batch (``None`` when it can); ``size``: its JPEG bytes."""
    if img is None:
        return f"{where}: undecodable JPEG ({size} bytes)" if size else f"{where}: empty JPEG (0 bytes)"
    if frame_size is not None and tuple(img.shape[:2]) != tuple(frame_size):
        return (f"{where}: frame is {img.shape[1]}x{img.shape[0]}, the split's frames are "
                f"{frame_size[1]}x{frame_size[0]}")
    return None


def empty_jpegs(idx: Path) -> set[int]:
    """Positions of samples whose ``.jpg`` has 0 bytes (one regex over the file; a parse only on a hit)."""
    if not _EMPTY_JPG.search(idx.read_bytes()):
        return set()
    return {i for i, comp in enumerate(parse_idx(idx)) if "jpg" in comp and comp["jpg"][1] == 0}
