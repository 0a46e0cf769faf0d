"""The pre-training benchmark case runs end to end on a tiny shard folder and renders its section."""

from __future__ import annotations

from affpipe.bench.common import machine_info
from affpipe.bench.pretrain import TARGET_WAIT_SHARE, bench_pretrain, pretrain_markdown


def test_pretrain_case_measures_the_data_wait_of_a_two_view_step(shard_dir):
    row = bench_pretrain(shard_dir, device="cpu", batch_size=8, image_size=32, warmup=1, max_steps=2, seconds=0.5,
                         repeats=1, num_workers=1, arch="timm/test_resnet")
    assert row["views"] == 2 and row["backend"] == "torch" and row["frames"]["unlabelled"] > 0
    assert row["fps"] > 0 and row["loader_fps"] > 0 and 0.0 <= row["data_wait_share"] <= 1.0
    assert row["met"] == (row["data_wait_share"] < TARGET_WAIT_SHARE)
    text = pretrain_markdown(row, machine_info())
    assert "data wait" in text and "| fed by the pre-training loader |" in text
