"""Small test videos with a real face (scikit-image's astronaut, in its wheel), written with cv2."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

W, H = 200, 112
# crop settings for these small videos: a 4-frame track is a real one here.
TEST_SETTINGS = {"min_track": 4, "progress": False, "workers": 2}


def need_detector_and_face() -> None:
    """Skip the calling test module where facenet-pytorch or scikit-image is not installed."""
    import pytest

    pytest.importorskip("facenet_pytorch", reason="affpipe crop needs facenet-pytorch (make install)",
                        exc_type=ImportError)
    pytest.importorskip("skimage", reason="the test face is scikit-image's astronaut (the dev extra)")
FPS = 25


def astronaut_face(height: int = 72) -> np.ndarray:
    """BGR patch around the astronaut's face (the face ~30 px wide at the default height)."""
    from skimage import data

    rgb = data.astronaut()[30:230, 135:315]
    patch = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    return cv2.resize(patch, (round(patch.shape[1] * height / patch.shape[0]), height), interpolation=cv2.INTER_AREA)


def place(frame: np.ndarray, patch: np.ndarray, cx: float, cy: float, scale: float = 1.0, angle: float = 0.0) -> None:
    """Paste ``patch`` rotated by ``angle`` degrees and scaled, centred at (cx, cy)."""
    h, w = patch.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += (cx - w / 2, cy - h / 2)
    mask = cv2.warpAffine(np.full((h, w), 255, np.uint8), m, (frame.shape[1], frame.shape[0]))
    warped = cv2.warpAffine(patch, m, (frame.shape[1], frame.shape[0]))
    frame[mask > 0] = warped[mask > 0]


def background() -> np.ndarray:
    return np.full((H, W, 3), 90, np.uint8)


def single_face_frames(n: int = 14, blank: tuple[int, ...] = (6, 7, 8)) -> list[np.ndarray]:
    """One face that moves right, grows and tilts a few degrees; ``blank`` frames (0-based) empty."""
    face = astronaut_face()
    frames = []
    for i in range(n):
        f = background()
        if i not in blank:
            place(f, face, 70 + 4 * i, 56, 1.0 + 0.02 * i, angle=-6 + i)
        frames.append(f)
    return frames


def two_face_frames(n: int = 10, second: range = range(3, 10)) -> list[np.ndarray]:
    """The face on the left throughout, a mirrored copy on the right in ``second`` frames."""
    face = astronaut_face()
    mirror = face[:, ::-1].copy()
    frames = []
    for i in range(n):
        f = background()
        place(f, face, 50 + i, 56)
        if i in second:
            place(f, mirror, 150 - i, 58)
        frames.append(f)
    return frames


def write_video(path: Path, frames: list[np.ndarray], fourcc: str = "MJPG") -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (w, h))
    assert writer.isOpened(), f"cv2.VideoWriter cannot write {fourcc} here"
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def rotate_mp4(path: Path, out: Path, degrees: int = 90) -> Path:
    """A copy of an mp4 with a rotation display matrix in its track header, as phones write."""
    data = bytearray(path.read_bytes())
    i = data.find(b"tkhd")
    assert i > 0 and data[i + 4] == 0, "expected a version-0 tkhd box"
    off = i + 4 + 4 + 20 + 8 + 8  # version/flags, times + track id + reserved + duration, reserved, layer..volume
    a, b = {90: (0, 1), 180: (-1, 0), 270: (0, -1)}[degrees]
    one = 1 << 16
    data[off:off + 36] = struct.pack(">9i", a * one, b * one, 0, -b * one, a * one, 0, 0, 0, 1 << 30)
    out.write_bytes(bytes(data))
    return out
