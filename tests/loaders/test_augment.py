"""Augmentation semantics: the folded flip+rotation matrix equals flip-then-rotate, both
coordinate conventions agree, and the draws follow the configured rates."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from affpipe.loaders.augment import (
    AugmentConfig,
    affine_matrix,
    resize_linear,
    sample_params,
    warp_nearest,
)


def _apply(m: np.ndarray, x: float, y: float) -> tuple[float, float]:
    return tuple(m @ np.array([x, y, 1.0]))


def test_identity_and_flip():
    assert np.allclose(affine_matrix(0.0, False, 112), [[1, 0, 0], [0, 1, 0]])
    img = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    assert np.array_equal(warp_nearest(img, 0.0, False), img)
    assert np.array_equal(warp_nearest(img, 0.0, True), img[:, ::-1])


@pytest.mark.parametrize("angle", [-10.0, -3.3, 7.0])
@pytest.mark.parametrize("flip", [False, True])
def test_matrix_is_rotate_after_flip(angle, flip):
    m = affine_matrix(angle, flip, 112)
    rot = cv2.getRotationMatrix2D((55.5, 55.5), angle, 1.0)  # OpenCV: counter-clockwise positive
    for x, y in [(0, 0), (111, 0), (20, 90)]:
        fx = 111 - x if flip else x
        assert np.allclose(_apply(m, x, y), _apply(rot, fx, y))


def test_counter_clockwise_on_screen():
    # a point right of the centre moves up (smaller y) for a positive angle, as in torchvision
    x, y = _apply(affine_matrix(10.0, False, 112), 100.0, 55.5)
    assert y < 55.5 and x < 100.0


def test_corner_convention_is_the_same_transform():
    mi, mc = affine_matrix(8.0, True, 112), affine_matrix(8.0, True, 112, corner=True)
    for x, y in [(0, 0), (50, 70), (111, 111)]:
        assert np.allclose(np.array(_apply(mi, x, y)) + 0.5, _apply(mc, x + 0.5, y + 0.5))


def test_rates_and_ranges():
    cfg = AugmentConfig(flip_p=0.25, max_rotation=10.0)
    flip, angle = sample_params(np.random.default_rng(0), 20000, cfg)
    assert abs(flip.mean() - 0.25) < 0.02
    assert angle.min() >= -10 and angle.max() <= 10 and abs(angle.mean()) < 0.2
    flip, angle = sample_params(np.random.default_rng(0), 10, AugmentConfig(train=False))
    assert not flip.any() and not angle.any()
    with pytest.raises(ValueError, match="flip_p"):
        AugmentConfig(flip_p=1.5)


def test_resize_linear():
    img = np.full((112, 112, 3), 77, np.uint8)
    assert resize_linear(img, 112) is img
    assert resize_linear(img, 224).shape == (224, 224, 3) and int(resize_linear(img, 64)[5, 5, 0]) == 77
