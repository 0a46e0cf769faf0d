"""Train-time augmentation: the research's semantics, shared by every loader backend.

The research ran torchvision's ``Resize(image_size)`` → ``RandomHorizontalFlip(p)`` →
``RandomRotation(10)`` (uniform angle in [-10°, 10°], counter-clockwise positive, about the
image centre, nearest-neighbour, black fill). The fast loaders keep those semantics but fold
the flip into the rotation's affine matrix so one nearest-neighbour warp does both steps:

    dst = R(angle) · F(flip) · src          (F = mirror about the vertical centre line)

A linear resize, when ``image_size`` differs from the source size, runs before the warp (as
in the research). Labels never change: a horizontal flip does not change valence, arousal,
expression or which AUs are active.

Coordinates: ``affine_matrix(..., corner=False)`` uses pixel-index coordinates (pixel centres
at integers, OpenCV's ``warpAffine``), ``corner=True`` the pixel-corner convention of DALI's
``warp_affine`` (pixel centres at ``i + 0.5``). Both describe the same geometric transform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

NATIVE_SIZE = 112  # Aff-Wild2 cropped-aligned frames are 112 x 112


@dataclass(frozen=True)
class AugmentConfig:
    """What a loader does to each image. ``train=False`` turns flip and rotation off."""

    image_size: int = NATIVE_SIZE
    train: bool = True
    flip_p: float = 0.5
    max_rotation: float = 10.0  # degrees; the angle is uniform in [-max_rotation, max_rotation]

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")
        if not 0.0 <= self.max_rotation <= 180.0:
            raise ValueError(f"max_rotation must be in [0, 180] degrees, got {self.max_rotation}")

    @property
    def augments(self) -> bool:
        """Whether any per-sample geometric step runs (so a warp is needed at all)."""
        return self.train and (self.flip_p > 0.0 or self.max_rotation > 0.0)


def sample_params(rng: np.random.Generator, n: int, cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample ``(flip bool [n], angle float32 [n] degrees)`` drawn with ``cfg``'s semantics."""
    if not cfg.augments:
        return np.zeros(n, bool), np.zeros(n, np.float32)
    flip = rng.random(n) < cfg.flip_p
    angle = rng.uniform(-cfg.max_rotation, cfg.max_rotation, n).astype(np.float32)
    return flip, angle


def affine_matrix(angle: float, flip: bool, size: int, *, corner: bool = False) -> np.ndarray:
    """Forward (source → destination) ``2x3`` matrix of ``R(angle) · F(flip)`` for a square image.

    ``angle`` in degrees, counter-clockwise on screen positive (torchvision, OpenCV). The centre
    is the image centre: ``(size - 1) / 2`` in pixel-index coordinates, ``size / 2`` with
    ``corner=True``.
    """
    c = size / 2.0 if corner else (size - 1) / 2.0
    a, b = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    s = -1.0 if flip else 1.0
    # R about c:  x' = c + a(x-c) + b(y-c),  y' = c - b(x-c) + a(y-c)   (y points down)
    # F about c:  x -> 2c - x  => substitute (x - c) -> s (x - c)
    return np.array(
        [
            [a * s, b, c - a * s * c - b * c],
            [-b * s, a, c + b * s * c - a * c],
        ],
        dtype=np.float64,
    )


def affine_matrices(angles: np.ndarray, flips: np.ndarray, size: int, *, corner: bool = False) -> np.ndarray:
    """``affine_matrix`` of a whole batch at once: ``[n, 2, 3]`` float64 (numpy instead of a
    Python call per sample)."""
    c = size / 2.0 if corner else (size - 1) / 2.0
    rad = np.radians(np.asarray(angles, np.float64))
    a, b = np.cos(rad), np.sin(rad)
    s = np.where(np.asarray(flips, bool), -1.0, 1.0)
    return np.stack([np.stack([a * s, b, c - a * s * c - b * c], 1),
                     np.stack([-b * s, a, c + b * s * c - a * c], 1)], 1)


def warp_nearest(image: np.ndarray, angle: float, flip: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Flip + rotate one ``HxWxC`` uint8 square image, nearest-neighbour, black fill (OpenCV)."""
    import cv2

    size = image.shape[0]
    m = affine_matrix(angle, flip, size)
    return cv2.warpAffine(
        image, m, (size, size), dst=out, flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0),
    )


def warp_batch(images: np.ndarray, flips: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """``warp_nearest`` on every image of a uint8 ``NHWC`` batch, into a new array."""
    out = np.empty_like(images)
    for k in range(len(images)):
        warp_nearest(images[k], float(angles[k]), bool(flips[k]), out=out[k])
    return out


def resize_linear(image: np.ndarray, size: int) -> np.ndarray:
    """Resize one ``HxWxC`` image to ``size x size`` (area when shrinking, like an antialiased
    bilinear resize; bilinear when enlarging). A no-op when it already has that size."""
    import cv2

    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrink = image.shape[0] > size or image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
