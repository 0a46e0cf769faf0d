import numpy as np
import pytest
import torch

from affpipe.scoring.metrics import MetricAccumulator
from affpipe.temporal.smoothing import load_windows, moving_average, save_windows, smooth, tune


def test_moving_average_is_per_video_over_frame_numbers():
    v = np.array([1.0, 2, 3, 10, 20])[:, None]
    video = np.array(["a", "a", "a", "b", "b"])
    frame = np.array([1, 2, 4, 1, 2])
    out = moving_average(v, video, frame, 3)
    np.testing.assert_allclose(out[:, 0], [1.5, 1.5, 3, 15, 15])  # frame 4's window [3, 5] holds only itself
    perm = np.array([4, 2, 0, 3, 1])
    np.testing.assert_allclose(moving_average(v[perm], video[perm], frame[perm], 3)[:, 0], out[perm, 0])
    np.testing.assert_array_equal(moving_average(v, video, frame, 1), v.astype(np.float32))
    with pytest.raises(ValueError, match="odd"):
        moving_average(v, video, frame, 4)


def _noisy_accumulator(n=600):
    rng = np.random.default_rng(0)
    f = np.arange(n)
    truth = np.stack([np.sin(f / 40.0), np.cos(f / 50.0)], 1).astype(np.float32)
    cls = (np.sin(f / 30.0) > 0).astype(np.int64) * 4
    au = (np.sin(f[:, None] / 25.0 + np.arange(12)) > 0.3).astype(np.float32)
    acc = MetricAccumulator(("va", "expr", "au"))
    logits_e = np.full((n, 8), -2.0)
    logits_e[f, cls] = 0.0
    acc.update({"va": torch.from_numpy(truth + rng.normal(0, 0.6, truth.shape).astype(np.float32)),
                "expr": torch.from_numpy(logits_e + rng.normal(0, 2.0, (n, 8))),
                "au": torch.from_numpy((au - 0.5) * 2 + rng.normal(0, 1.5, au.shape))},
               {"row_id": torch.arange(n), "va": torch.from_numpy(truth), "va_mask": torch.ones(n, dtype=torch.bool),
                "expr": torch.from_numpy(cls), "expr_mask": torch.ones(n, dtype=torch.bool),
                "au": torch.from_numpy(au), "au_mask": torch.ones(n, 12, dtype=torch.bool)})
    return acc, np.zeros(n, int), f


def test_tuned_smoothing_helps_noisy_predictions_and_never_hurts(tmp_path):
    acc, video, frame = _noisy_accumulator()
    windows, scores = tune(acc, video, frame)
    before, after = acc.compute(), smooth(acc, video, frame, windows).compute()
    for task, key in (("va", "va_ccc"), ("expr", "expr_f1"), ("au", "au_f1")):
        assert windows[task] > 1 and after[key] > before[key]
        assert scores[task][windows[task]] == pytest.approx(after[key])
    save_windows(tmp_path, windows, split="val", checkpoint="best.pt", scores=scores)
    assert load_windows(tmp_path) == windows
    assert smooth(acc, video, frame, {"va": 1, "expr": 1, "au": 1}) is acc


def test_load_windows_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--tune-smoothing"):
        load_windows(tmp_path)
    (tmp_path / "smoothing.json").write_text('{"windows": {"va": 4}}')
    with pytest.raises(ValueError, match="odd"):
        load_windows(tmp_path)
