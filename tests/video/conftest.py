"""Shared fixtures of the crop tests: small videos of a real face, cropped once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from video import media  # tests/ is on sys.path (pyproject's pythonpath)
from video.media import TEST_SETTINGS


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> Path:
    """clips/single.avi (one face moving, growing, tilting; frames 7-9 blank) and clips/pair.avi
    (a second, mirrored face on the right from frame 4)."""
    root = tmp_path_factory.mktemp("clips")
    media.write_video(root / "single.avi", media.single_face_frames())
    media.write_video(root / "pair.avi", media.two_face_frames())
    return root


@pytest.fixture(scope="session")
def cropped(clips, tmp_path_factory) -> tuple[Path, dict]:
    """The tree ``affpipe crop clips/`` writes, and its summary."""
    from affpipe.video import CropConfig, crop

    tree = tmp_path_factory.mktemp("crop") / "tree"
    summary = crop(CropConfig(inputs=(clips,), out=tree, **TEST_SETTINGS))
    return tree, summary
