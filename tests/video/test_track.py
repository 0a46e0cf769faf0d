"""Tracking, naming and alignment maths of `affpipe crop`, without a detector (milliseconds)."""

from __future__ import annotations

import numpy as np
import pytest

from affpipe.io import is_safe_name
from affpipe.video import TEMPLATE_112, build_tracks, similarity_matrix, track_names, video_name


def _box(cx: float, cy: float = 50, w: float = 30) -> np.ndarray:
    return np.array([cx - w / 2, cy - w / 2, cx + w / 2, cy + w / 2], np.float32)


def _frames(*per_frame: list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(f, np.float32).reshape(-1, 4) for f in per_frame]


def test_one_moving_face_is_one_track_across_a_gap():
    frames = _frames(*[[_box(40 + 3 * i)] for i in range(10)], [], [], [], *[[_box(70 + 3 * i)] for i in range(10)])
    tracks, dropped = build_tracks(frames, min_length=4, max_gap=5)
    assert len(tracks) == 1 and dropped == 0 and len(tracks[0].members) == 20


def test_a_face_that_leaves_for_long_is_joined_at_the_same_place():
    frames = _frames(*[[_box(50)] for _ in range(6)], *[[] for _ in range(40)], *[[_box(55)] for _ in range(6)])
    tracks, _ = build_tracks(frames, min_length=4, max_gap=5)
    assert len(tracks) == 1 and len(tracks[0].members) == 12


def test_two_faces_are_two_tracks_ordered_left_to_right_even_when_they_cross_order_of_appearance():
    frames = _frames(*[[_box(150), _box(40)] for _ in range(8)])
    tracks, _ = build_tracks(frames, min_length=4, max_gap=5)
    assert [round(float(t.center()[0])) for t in tracks] == [40, 150]


def test_short_spurious_tracks_are_dropped_and_counted():
    frames = _frames(*[[_box(50)] + ([_box(150)] if i == 3 else []) for i in range(10)])
    tracks, dropped = build_tracks(frames, min_length=4, max_gap=5)
    assert len(tracks) == 1 and dropped == 1


def test_tracking_is_deterministic():
    rng = np.random.default_rng(0)
    frames = _frames(*[[_box(x) for x in sorted(rng.uniform(20, 300, rng.integers(0, 4)))] for _ in range(50)])
    a, da = build_tracks(frames, min_length=2, max_gap=3)
    b, db = build_tracks(frames, min_length=2, max_gap=3)
    assert da == db and [t.members for t in a] == [t.members for t in b]


def test_names_follow_the_release():
    assert track_names("v", 1) == ["v"]
    assert track_names("v", 2) == ["v_left", "v_right"]
    assert track_names("v", 3) == ["v_1", "v_2", "v_3"]


@pytest.mark.parametrize("raw", ["a\\b", ".hidden", "x" * 300, "caf\udce9", "..", "\0x"])
def test_unsafe_video_names_are_mapped_deterministically(raw):
    name = video_name(raw)
    assert is_safe_name(name) and not name.startswith(".") and name == video_name(raw)
    assert name != video_name(raw + "y")


def test_plain_names_are_kept():
    for raw in ("video 12", "ünïcødé 顔", "10-60-1280x720"):
        assert video_name(raw) == raw


def test_similarity_recovers_an_exact_similarity():
    angle, scale, t = np.deg2rad(12), 2.7, np.array([130.0, 45.0])
    r = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = (TEMPLATE_112 - t) @ np.linalg.inv(scale * r).T  # points that map exactly onto the template
    m = similarity_matrix(src)
    assert np.allclose(src @ m[:, :2].T + m[:, 2], TEMPLATE_112, atol=1e-9)


def test_similarity_never_mirrors():
    m = similarity_matrix(TEMPLATE_112 * [-1, 1])  # a mirrored face
    assert np.linalg.det(m[:, :2]) > 0
