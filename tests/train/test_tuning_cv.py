"""Honest tuning: AU thresholds and smoothing windows scored by cross-validation over videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from affpipe.scoring.metrics import MetricAccumulator, au_f1, video_folds
from affpipe.temporal.smoothing import moving_average, tune, tune_cross_validated


def _acc(videos: int = 12, frames: int = 60, signal: float = 0.0, seed: int = 0):
    """Predictions over ``videos`` videos; ``signal`` 0 makes AU probabilities pure noise."""
    rng = np.random.default_rng(seed)
    n = videos * frames
    f = np.tile(np.arange(frames), videos)
    truth = np.stack([np.sin(f / 9.0), np.cos(f / 11.0)], 1).astype(np.float32)
    au = (rng.random((n, 12)) < 0.3).astype(np.float32)
    cls = rng.integers(0, 8, n)
    acc = MetricAccumulator(("va", "expr", "au"))
    acc.update({"va": torch.from_numpy(truth + rng.normal(0, 0.5, truth.shape).astype(np.float32)),
                "expr": torch.from_numpy(rng.normal(0, 1, (n, 8))),
                "au": torch.from_numpy(signal * (au - 0.5) + rng.normal(0, 1, au.shape))},
               {"row_id": torch.arange(n), "va": torch.from_numpy(truth), "va_mask": torch.ones(n, dtype=torch.bool),
                "expr": torch.from_numpy(cls), "expr_mask": torch.ones(n, dtype=torch.bool),
                "au": torch.from_numpy(au), "au_mask": torch.ones(n, 12, dtype=torch.bool)})
    return acc, np.repeat([f"v{i:02d}" for i in range(videos)], frames), f


def test_video_folds_keep_videos_together_and_balance():
    videos = np.repeat(list("abcdefg"), [3, 1, 4, 1, 5, 9, 2])
    fold = video_folds(videos, 3, seed=1)
    for v in np.unique(videos):
        assert len(set(fold[videos == v])) == 1  # a video's frames are never split
    per_fold = [len(set(videos[fold == k])) for k in range(3)]
    assert sorted(per_fold) == [2, 2, 3]
    np.testing.assert_array_equal(fold, video_folds(videos, 3, seed=1))
    for bad in (1, 8):
        with pytest.raises(ValueError, match="tune-folds"):
            video_folds(videos, bad)


def test_cross_validated_thresholds_match_a_manual_loop_and_are_not_optimistic():
    acc, videos, _ = _acc(signal=0.0)
    cv = acc.cross_validated_au(videos, folds=3, seed=2)
    a = acc.state()
    fold = video_folds(videos, 3, seed=2)
    pred = np.zeros((len(videos), 12), bool)
    for k in range(3):
        sub = MetricAccumulator(acc.tasks)
        sub.update({"va": torch.from_numpy(a["va_pred"][fold != k]), "expr": torch.zeros((fold != k).sum(), 8),
                    "au": torch.logit(torch.from_numpy(a["au_prob"][fold != k]).double()).float()},
                   {"row_id": torch.from_numpy(a["row_id"][fold != k]), "va": torch.from_numpy(a["va_target"][fold != k]),
                    "va_mask": torch.from_numpy(a["va_mask"][fold != k]),
                    "expr": torch.from_numpy(a["expr_target"][fold != k].astype(np.int64)),
                    "expr_mask": torch.from_numpy(a["expr_mask"][fold != k]),
                    "au": torch.from_numpy(a["au_target"][fold != k].astype(np.float32)),
                    "au_mask": torch.from_numpy(a["au_mask"][fold != k])})
        thr = np.asarray(sub.tune_au_thresholds())
        assert thr.tolist() == cv["fold_thresholds"][k]
        pred[fold == k] = a["au_prob"][fold == k] >= thr
    assert cv["au_f1"] == pytest.approx(au_f1(pred, a["au_target"], a["au_mask"])[0])
    # Pure noise: thresholds tuned on the split flatter the score there; cross-validation does not.
    in_split = acc.compute(au_thresholds=acc.tune_au_thresholds())["au_f1"]
    assert in_split > cv["au_f1"]
    assert cv["p_mtl"] == pytest.approx(acc.compute()["va_ccc"] + acc.compute()["expr_f1"] + cv["au_f1"])


def test_cross_validated_smoothing_uses_windows_tuned_on_the_other_videos():
    acc, videos, frames = _acc(videos=8)
    res = tune_cross_validated(acc, videos, frames, folds=2, seed=0)
    fold = video_folds(videos, 2, seed=0)
    state, got = acc.state(), res["acc"].state()
    for k in range(2):
        held = fold == k
        windows, _ = tune(acc.subset(~held), videos[~held], frames[~held])
        assert windows == res["fold_windows"][k]
        want = moving_average(state["va_pred"][held], videos[held], frames[held], windows["va"])
        np.testing.assert_allclose(got["va_pred"][held], want, rtol=1e-6)
    assert windows["va"] > 1  # noisy smooth VA: smoothing is chosen, and it helps on held-out videos too
    assert res["scores"]["va_ccc"] > acc.compute()["va_ccc"]
    np.testing.assert_array_equal(got["va_target"], state["va_target"])  # labels untouched


def test_cross_validated_entries_carry_intervals():
    from affpipe.scoring.bootstrap import cross_validated_au
    from affpipe.temporal.smoothing import cross_validated_result

    acc, videos, frames = _acc(videos=8, signal=2.0)
    au = cross_validated_au(acc, videos, 2)
    assert au["au_f1"] == pytest.approx(acc.cross_validated_au(videos, 2)["au_f1"])
    lo, hi = au["ci"]["au_f1"]
    assert lo <= au["au_f1"] <= hi and au["folds"] == 2 and len(au["fold_thresholds"]) == 2
    sm = cross_validated_result(acc, videos, frames, 2)
    assert sm["va_ccc"] == pytest.approx(tune_cross_validated(acc, videos, frames, 2)["scores"]["va_ccc"])
    assert set(sm["ci"]) >= {"va_ccc", "expr_f1", "au_f1", "p_mtl"} and len(sm["fold_windows"]) == 2
