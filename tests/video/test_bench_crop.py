"""The `crop` benchmark row runs end to end (2 frames; the figures themselves are BENCHMARKS.md's)."""

from __future__ import annotations

import pytest
from video import media

from affpipe.bench.crop import bench_crop, crop_markdown

media.need_detector_and_face()


def test_the_crop_row_compares_crop_with_the_naive_loop(tmp_path):
    row = bench_crop(tmp_path / "crop", frames=2, repeats=1)
    assert row["naive_fps"] > 0 and row["crop_fps"] > 0 and row["predict_video_fps"] > 0
    # the row rounds the ratio to 2 decimals (and the frame rates it comes from): absolute tolerance
    assert row["ratio"] == pytest.approx(row["crop_fps"] / row["naive_fps"], rel=0.02, abs=0.006)
    text = crop_markdown(row, {"cpu": "test", "cores": 2})
    assert "naive loop" in text and "affpipe crop" in text and "predict MODEL --video" in text and "Target" in text
    assert not (tmp_path / "crop" / "work").exists()  # its clip and outputs are cleaned up
