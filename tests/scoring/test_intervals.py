"""Issue 25's statistics on arrays (no training): seeds resampled, recordings as one unit, n/a classes,
Holm, nested cross-validation, evaluation variants in files of their own, best-is-start."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from affpipe.labels import NUM_AU, NUM_EXPR
from affpipe.scoring import bootstrap as bs
from affpipe.scoring import intervals as iv
from affpipe.scoring.metrics import MetricAccumulator, video_folds


def _state(videos: list[str], frames: int = 30, seed: int = 0, expr_classes: int = NUM_EXPR) -> dict:
    rng = np.random.default_rng(seed)
    n = len(videos) * frames
    va = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    expr = rng.integers(0, expr_classes, n)
    au = (rng.random((n, NUM_AU)) < 0.3).astype(np.float32)
    au[:, 5] = 0  # AU10 never positive
    acc = MetricAccumulator(("va", "expr", "au"))
    acc.update({"va": torch.tensor(va + rng.normal(0, 0.5, va.shape), dtype=torch.float32),
                "expr": torch.tensor(rng.normal(0, 1, (n, NUM_EXPR)), dtype=torch.float32),
                "au": torch.tensor(au * 2 - 1 + rng.normal(0, 1.5, au.shape), dtype=torch.float32)},
               {"row_id": torch.arange(n), "va": torch.tensor(va), "va_mask": torch.ones(n, dtype=torch.bool),
                "expr": torch.tensor(expr), "expr_mask": torch.ones(n, dtype=torch.bool),
                "au": torch.tensor(au), "au_mask": torch.ones(n, NUM_AU, dtype=torch.bool)})
    return {"acc": acc, "video": np.repeat(videos, frames), "frame": np.tile(np.arange(frames), len(videos))}


def test_two_level_bootstrap_has_fewer_false_findings_than_pooled_seeds():
    from affpipe.bench.coverage import Population, false_findings

    # Two identical recipes, 3 seeds each, strong seed effects: pooling the seeds per resample
    # conditions on the seeds drawn and calls seed noise a difference; resampling seeds does not.
    pop = Population(mean_frames=60, seed_sd=0.4, seed_video_sd=0.3)
    got = false_findings(20, [3], reps=24, resamples=150, seed=1, pop=pop)["3"]
    pooled = sum(got["pooled"].values())
    two = sum(got["two_level"].values())
    assert two < pooled and got["pooled"]["p_mtl"] > 0.1


def test_two_level_with_one_seed_is_the_paired_bootstrap():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=101), rng.normal(size=101)
    np.testing.assert_allclose(iv.two_level([a], [b]), a - b)


def test_recording_subjects_are_one_resampling_and_folding_unit():
    videos = ["r1_left", "r1_right", "r2", "r3_left", "r3_right", "r4"]
    s = _state(videos)
    stats = bs.video_stats(s["acc"].state(), s["video"])
    assert stats.videos.tolist() == ["r1", "r2", "r3", "r4"]
    assert stats.labelled["va"] == {"videos": 6, "units": 4}
    apart = bs.video_stats(s["acc"].state(), s["video"], unit="video")
    assert len(apart.videos) == 6
    # Grouping only regroups sums: the full-split metrics are the same either way.
    one = bs.metrics_from_stats(stats, np.ones((1, 4)))
    six = bs.metrics_from_stats(apart, np.ones((1, 6)))
    assert one["p_mtl"] == pytest.approx(six["p_mtl"])
    fold = video_folds(s["video"], 2, seed=3)
    for rec in ("r1", "r3"):
        assert len(set(fold[np.char.startswith(s["video"].astype(str), rec)])) == 1
    assert bs.recording_of(["a_left", "a_right_x", "b_right"]).tolist() == ["a", "a_right_x", "b"]


def test_unlabelled_classes_are_na_and_said_in_or_out_of_the_macro():
    from affpipe.train.evaluate import eval_markdown

    s = _state([f"v{i}" for i in range(5)], expr_classes=6)  # Surprise (6) and Other (7) never labelled
    res = {**s["acc"].compute(), "task": "mtl", "split": "val",
           **bs.bootstrap_result(s["acc"].state(), s["video"], resamples=50, how="percentile")}
    assert res["unlabelled"] == {"expr": {"no_label": ["Surprise", "Other"]}, "au": {"no_positive": ["AU10"]}}
    md = eval_markdown(res)
    assert "| Surprise | n/a |" in md and "| Other | n/a |" in md and "| AU10 | n/a |" in md
    assert "**in** the macro F1 as 0" in md and "AUs never positive (AU10)" in md
    assert "| EXPR macro F1 |" in md and "| 5 |" in md  # the per-task video count beside the interval


def test_holm():
    assert iv.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert np.isnan(iv.holm([0.01, float("nan")])[1])
    rows = [{"ci": [0.1, 0.2], "p": 0.01, "excludes_zero": True}, {"ci": [0.01, 0.2], "p": 0.04, "excludes_zero": True},
            {"ci": [-0.1, 0.2], "p": 0.5, "excludes_zero": False}]
    counts = iv.multiplicity(rows)
    assert counts == {"examined": 3, "exclude_zero": 2, "hold_holm": 1}
    assert [r["holds"] for r in rows] == [True, False, False]
    assert iv.multiplicity_line(counts) == ("Multiplicity: 3 intervals examined, 2 exclude 0; after Holm's adjustment "
                                            "over the 3: 1 holds.")
    assert iv.p_value(np.array([1.0, 2.0, -1.0, 3.0])) == pytest.approx(0.5)


def test_interval_methods_agree_on_an_easy_case_and_studentized_is_default():
    s = _state([f"v{i}" for i in range(12)], frames=40)
    stats = bs.video_stats(s["acc"].state(), s["video"])
    w = bs.resample_weights(12, 400, seed=1)
    point = bs.metrics_from_stats(stats, np.ones((1, 12)))["va_ccc"][0]
    got = {how: bs.interval_bounds(stats, w, how=how, keys=["va_ccc"])["va_ccc"] for how in iv.METHODS}
    for lo, hi in got.values():
        assert lo < point < hi
    assert abs(got["studentized"][1] - got["studentized"][0]) < 3 * abs(got["percentile"][1] - got["percentile"][0])
    assert iv.DEFAULT_METHOD == "studentized"


def test_nested_cross_validation_never_tunes_on_the_held_out_fold(monkeypatch):
    from affpipe.temporal import smoothing as sm

    s = _state([f"v{i}" for i in range(6)], frames=25)
    seen: list[set[int]] = []
    real_thr, real_tune = MetricAccumulator.tune_au_thresholds, sm.tune

    def spy_thr(self, *a, **k):
        seen.append(set(self.state()["row_id"].tolist()))
        return real_thr(self, *a, **k)

    def spy_tune(acc, *a, **k):
        seen.append(set(acc.state()["row_id"].tolist()))
        return real_tune(acc, *a, **k)

    monkeypatch.setattr(MetricAccumulator, "tune_au_thresholds", spy_thr)
    monkeypatch.setattr(sm, "tune", spy_tune)
    cv = sm.tune_cross_validated(s["acc"], s["video"], s["frame"], 3, seed=2, smoothing=True, tune_thresholds=True)
    fold = video_folds(s["video"], 3, seed=2)
    rows = s["acc"].state()["row_id"]
    train_sets = [set(rows[fold != k].tolist()) for k in range(3)]
    assert len(seen) == 9  # per fold: thresholds, windows at them, thresholds on the smoothed rows
    for i, got in enumerate(seen):
        assert got == train_sets[i // 3]  # only the other folds' rows, never a held-out one
    assert cv["tuned"] == ["smoothing", "AU thresholds"] and len(cv["fold_thresholds"]) == 3
    # Leakage would show: thresholds tuned on all rows score pure-noise AUs better than nested ones.
    acc = s["acc"]
    leaky = acc.compute(au_thresholds=real_thr(acc))["au_f1"]
    assert cv["scores"]["au_f1"] < leaky


def test_evaluation_variants_write_files_of_their_own(tmp_path):
    from affpipe.run.config import TrainConfig
    from affpipe.train.evaluate import eval_stem, report_evaluation

    s = _state([f"v{i}" for i in range(4)])
    cfg = TrainConfig.of(task="mtl")
    report_evaluation(s["acc"], 120, cfg, tmp_path / "best.pt", {}, "val", videos=s["video"])
    raw = (tmp_path / "eval.json").read_text()
    report_evaluation(s["acc"], 120, cfg, tmp_path / "best.pt", {}, "val", videos=s["video"],
                      extra={"smoothing": {"windows": {"va": 5}, "tuned_on": "val"}})
    assert (tmp_path / "eval.json").read_text() == raw  # the smoothed figures never replace the raw ones
    md = (tmp_path / "eval_smoothed.md").read_text()
    assert "smoothed predictions" in md and "| VA CCC (mean of valence, arousal) (smoothed) |" in md
    assert "optimistic" in md and (tmp_path / "eval_smoothed_predictions.npz").is_file()
    assert eval_stem("test", smoothed=True) == "eval_test_smoothed"


def test_best_is_the_start_is_said(tmp_path):
    """A kind whose step-0 state is a best.pt candidate (temporal) marks an evaluation of that
    state; eval.md says it; a per-frame kind never does."""
    from affpipe.run.config import TrainConfig
    from affpipe.runs.kinds import kind_named
    from affpipe.train.evaluate import report_evaluation

    assert kind_named("temporal").start_is_candidate and not kind_named("frames").start_is_candidate
    s = _state([f"v{i}" for i in range(4)])
    cfg = TrainConfig.of(task="mtl")
    for step, said in ((0, True), (10, False)):
        report_evaluation(s["acc"], 120, cfg, tmp_path / "best.pt", {"step": step}, "val", start_is_candidate=True)
        assert json.loads((tmp_path / "eval.json").read_text())["best_is_start"] is said
        assert ("Best is the start (no step improved)" in (tmp_path / "eval.md").read_text()) is said
    report_evaluation(s["acc"], 120, cfg, tmp_path / "best.pt", {"step": 0}, "val")
    assert "best_is_start" not in json.loads((tmp_path / "eval.json").read_text())


def test_studentized_bounds_stay_inside_each_metrics_range():
    """With a handful of recordings a bootstrap-t bound runs off (seen: VA CCC up to 1e14, AU F1
    down to -15): every interval is clipped to what the metric can take."""
    seen_outside = 0
    for seed in range(3):
        s = _state([f"v{i}" for i in range(4)], frames=5, seed=seed)
        stats = bs.video_stats(s["acc"].state(), s["video"])
        w = bs.resample_weights(4, 300, seed=1)
        fn = lambda w_, st=stats: bs.metrics_from_stats(st, w_)  # noqa: E731
        boot, point, jack, se = fn(w), fn(np.ones((1, 4))), fn(iv.jackknife_weights(4)), iv.resample_se(fn, w)
        got = bs.interval_bounds(stats, w)
        for k in ("va_ccc", "valence_ccc", "expr_f1", "au_f1", "p_mtl", "au_f1_per_au"):
            lo, hi = bs.metric_range(k)
            raw = iv.ci_bounds(point[k][0], boot[k], 0.95, "studentized", jack=jack[k], boot_se=se[k])
            seen_outside += int(np.nanmin(raw) < lo or np.nanmax(raw) > hi)
            b = got[k][np.isfinite(got[k])]
            assert ((b >= lo) & (b <= hi)).all(), (k, got[k])
    assert seen_outside > 0  # the case the clipping is for did occur
    with pytest.raises(KeyError):
        bs.metric_range("loss")
