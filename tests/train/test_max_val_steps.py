"""--max-val-steps scores batches that hold every validation video, or is refused naming the
smallest value that does (issue 25: a small value validated one video and gave p_mtl -inf)."""

from __future__ import annotations

import numpy as np
import pytest

from affpipe.loaders import LoaderConfig
from affpipe.run.config import load_config
from affpipe.train.evaluate import covering_batches, limited_batches

TINY = {"task": "mtl", "epochs": 1, "image_size": 32, "batch_size": 16, "max_steps_per_epoch": 1,
        "loader.num_workers": 0, "loader.backend": "torch", "device": "cpu", "log_every": 1}


def test_covering_batches_is_the_fewest_stabbing_set():
    assert covering_batches([{"a"}, {"a", "b"}, {"b"}, {"c"}, {"c", "d"}, {"d"}]) == [1, 4]
    assert covering_batches([{"a"}, {"a"}, {"a"}]) == [2]


def test_limited_batches_cover_every_video_and_are_the_loaders_own(shard_dir):
    from affpipe.loaders.factory import make_loader
    from affpipe.scoring.bootstrap import row_videos
    from affpipe.shards.format import shard_labels
    from affpipe.train.evaluate import evaluate_model

    videos_of = row_videos(shard_labels(shard_dir).table)
    loader = make_loader(shard_dir, "val", batch_size=16, train=False, image_size=32,
                         loader=LoaderConfig(backend="torch", num_workers=0))
    every = [b.row_id.numpy() for b in loader]
    assert all(np.array_equal(a, b) for a, b in zip(every, loader.batch_rows(), strict=True))
    need = len(covering_batches([set(videos_of(r).tolist()) for r in every]))
    assert 1 < need < len(loader)
    with pytest.raises(ValueError, match=f"smallest value that covers them is {need}") as err:
        limited_batches(loader, need - 1, videos_of)
    assert "\n" not in str(err.value)
    chosen = limited_batches(loader, need + 1, videos_of)
    assert len(chosen) == need + 1 and limited_batches(loader, len(loader), videos_of) is None
    seen = np.concatenate([every[b] for b in chosen])
    assert set(videos_of(seen)) == set(videos_of(np.concatenate(every)))

    import torch

    class Echo(torch.nn.Module):
        def forward(self, x):
            n = len(x)
            return {"va": torch.zeros(n, 2), "expr": torch.zeros(n, 8), "au": torch.zeros(n, 12)}

    acc, frames = evaluate_model(Echo(), loader, ("va", "expr", "au"), device=torch.device("cpu"), only=chosen)
    assert frames == sum(len(every[b]) for b in chosen)
    np.testing.assert_array_equal(np.sort(acc.state()["row_id"]), np.sort(seen))


def test_train_refuses_a_max_val_steps_that_misses_videos_and_scores_with_one_that_does(shard_dir, tmp_path):
    from affpipe.run.folder import RunFolder
    from affpipe.runs.train import train

    with pytest.raises(ValueError, match="--max-val-steps 1 cannot cover the 6 validation videos.*smallest value"):
        train(load_config(None, {**TINY, "max_val_steps": 1, "shards": shard_dir, "out": tmp_path / "a"}))
    run = train(load_config(None, {**TINY, "max_val_steps": 3, "shards": shard_dir, "out": tmp_path / "b"}))
    files = RunFolder(run)
    ev = files.read_eval()
    assert np.isfinite(ev["p_mtl"]) and files.best.is_file()
    assert "every validation video" in ev["note"]
