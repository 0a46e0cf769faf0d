"""Video bootstrap: intervals equal a plain loop over resampled frames, resampling is by video,
paired differences, the predictions file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from affpipe.labels import NUM_AU, NUM_EXPR
from affpipe.scoring import bootstrap as bs
from affpipe.scoring.metrics import MetricAccumulator, au_f1, expr_f1, va_ccc


def _fixture(videos: int = 7, frames: int = 40, seed: int = 0, noise: float = 0.5) -> tuple[dict, np.ndarray]:
    """A filled accumulator's state over ``videos`` videos of ``frames`` frames, with masked labels."""
    rng = np.random.default_rng(seed)
    n = videos * frames
    va = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    expr = rng.integers(0, NUM_EXPR, n)
    au = (rng.random((n, NUM_AU)) < 0.3).astype(np.float32)
    acc = MetricAccumulator(("va", "expr", "au"))
    logits = torch.tensor(rng.normal(0, 1, (n, NUM_EXPR)), dtype=torch.float32)
    logits[torch.arange(n), torch.tensor(expr)] += 1.0  # better than chance
    outputs = {"va": torch.tensor(va + rng.normal(0, noise, va.shape), dtype=torch.float32), "expr": logits,
               "au": torch.tensor(au * 2 - 1 + rng.normal(0, 1.5, au.shape), dtype=torch.float32)}
    batch = {"row_id": torch.arange(n), "va": torch.tensor(va), "va_mask": torch.tensor(rng.random(n) < 0.8),
             "expr": torch.tensor(expr), "expr_mask": torch.tensor(rng.random(n) < 0.7),
             "au": torch.tensor(au), "au_mask": torch.tensor(rng.random((n, NUM_AU)) < 0.9)}
    batch["au_mask"][: frames * 2, 3] = False  # AU 3 unannotated in two videos: some resamples lack it
    acc.update(outputs, batch)
    return acc.state(), np.repeat([f"vid{i:02d}" for i in range(videos)], frames)


def _loop_metrics(a: dict, rows: np.ndarray) -> dict[str, float]:
    """The metrics of the frames ``rows`` (repeats allowed), with the plain metric functions."""
    out = {}
    m = a["va_mask"][rows]
    out.update(va_ccc(a["va_pred"][rows][m], a["va_target"][rows][m]))
    m = a["expr_mask"][rows]
    out["expr_f1"], per = expr_f1(a["expr_pred"][rows][m], a["expr_target"][rows][m])
    out["expr_anger"] = per[1]
    out["au_f1"], per = au_f1(a["au_prob"][rows] >= 0.5, a["au_target"][rows], a["au_mask"][rows])
    out["au_3"] = per[3]
    out["p_mtl"] = out["va_ccc"] + out["expr_f1"] + out["au_f1"]
    return out


def test_full_weights_reproduce_the_accumulator():
    a, videos = _fixture()
    acc = MetricAccumulator.from_state(("va", "expr", "au"), a)
    want = acc.compute()
    got = bs.metrics_from_stats(bs.video_stats(a, videos), np.ones((1, 7)))
    for key in ("va_ccc", "valence_ccc", "arousal_ccc", "expr_f1", "au_f1", "p_mtl"):
        assert got[key][0] == pytest.approx(want[key], abs=1e-10), key
    assert got["au_f1_per_au"][0] == pytest.approx(list(want["au_f1_per_au"].values()), abs=1e-12)


def test_interval_equals_a_loop_over_resampled_videos():
    a, videos = _fixture()
    names = np.unique(videos)
    resamples, seed = 300, 5
    ci = bs.bootstrap_result(a, videos, resamples=resamples, seed=seed, how="percentile")
    # Independently: draw videos (the same seeded counts), gather their frames, score with metrics.py.
    counts = bs.resample_weights(len(names), resamples, seed).astype(int)
    assert (counts.sum(1) == len(names)).all()  # each resample draws as many videos as the split has
    loop: dict[str, list[float]] = {}
    for row in counts:
        rows = np.concatenate([np.flatnonzero(videos == v) for v, c in zip(names, row, strict=True) for _ in range(c)])
        for k, v in _loop_metrics(a, rows).items():
            loop.setdefault(k, []).append(v)
    for key, got in (("va_ccc", ci["ci"]["va_ccc"]), ("expr_f1", ci["ci"]["expr_f1"]), ("au_f1", ci["ci"]["au_f1"]),
                     ("p_mtl", ci["ci"]["p_mtl"]), ("expr_anger", ci["ci"]["expr_f1_per_class"]["Anger"]),
                     ("au_3", ci["ci"]["au_f1_per_au"]["AU6"])):
        want = np.nanpercentile(loop[key], [2.5, 97.5])
        assert got == pytest.approx(list(want), abs=1e-9), key
    assert {k: ci["ci_method"][k] for k in ("unit", "videos", "recordings", "resamples", "seed", "level", "interval")} \
        == {"unit": "recording", "videos": 7, "recordings": 7, "resamples": 300, "seed": 5, "level": 0.95,
            "interval": "percentile"}
    assert "few recordings" in ci["ci_method"]["warning"]
    # Seeded: the same call gives the same interval; another seed another one.
    assert bs.bootstrap_result(a, videos, resamples=resamples, seed=seed, how="percentile")["ci"] == ci["ci"]
    assert bs.bootstrap_result(a, videos, resamples=resamples, seed=6)["ci"]["va_ccc"] != ci["ci"]["va_ccc"]


def test_resampling_is_by_video_not_by_frame():
    # Ten videos; in one of them every prediction is wrong (valence sign flipped). Whole-video
    # resampling sees that video in or out as a block: its interval is much wider than one that
    # resamples frames independently (each frame its own unit), which averages the bad video away.
    rng = np.random.default_rng(1)
    videos = np.repeat([f"v{i}" for i in range(10)], 100)
    y = rng.uniform(-1, 1, (1000, 2))
    x = y + rng.normal(0, 0.1, y.shape)
    x[videos == "v3"] *= -1
    a = {"va_pred": x, "va_target": y, "va_mask": np.ones(1000, bool)}
    by_video = bs.bootstrap_result(a, videos, resamples=500)["ci"]["va_ccc"]
    by_frame = bs.bootstrap_result(a, np.arange(1000), resamples=500)["ci"]["va_ccc"]
    assert by_video[1] - by_video[0] > 3 * (by_frame[1] - by_frame[0])
    assert bs.bootstrap_result(a, videos, resamples=10)["ci_method"]["videos"] == 10


def test_paired_difference_and_pooling():
    a, videos = _fixture(seed=0)
    b = dict(a)
    b["va_pred"] = a["va_pred"] * 0.5  # a different (worse-scaled) model on the same frames and labels
    sa, sb = bs.video_stats(a, videos), bs.video_stats(b, videos)
    res = bs.paired(sa, sb, resamples=400, seed=3)
    full_a = bs.metrics_from_stats(sa, np.ones((1, 7)))
    full_b = bs.metrics_from_stats(sb, np.ones((1, 7)))
    assert res["va_ccc"]["diff"] == pytest.approx(full_a["va_ccc"][0] - full_b["va_ccc"][0])
    # Same weights for both sides: the interval is the percentile of per-resample differences.
    w = bs.resample_weights(7, 400, 3)
    d = bs.metrics_from_stats(sa, w)["va_ccc"] - bs.metrics_from_stats(sb, w)["va_ccc"]
    assert res["va_ccc"]["ci"] == pytest.approx(list(np.percentile(d, [2.5, 97.5])))
    # EXPR and AU predictions are identical: difference 0, interval [0, 0], not "excluding 0".
    assert res["expr_f1"]["diff"] == 0 and res["expr_f1"]["ci"] == [0, 0] and not res["expr_f1"]["excludes_zero"]
    # Pooled over "seeds": the mean of the runs' metrics per resample.
    pooled = bs.paired([sa, sa], [sb, sa], resamples=400, seed=3)
    assert pooled["va_ccc"]["diff"] == pytest.approx(res["va_ccc"]["diff"] / 2)
    other = bs.video_stats(a, np.where(videos == "vid00", "vidXX", videos))
    with pytest.raises(ValueError, match="same videos"):
        bs.paired(sa, other)


def test_predictions_file_round_trip_and_damage(tmp_path):
    a, videos = _fixture(videos=3, frames=5)
    path = bs.save_predictions(tmp_path / "eval_predictions.npz", a, videos)
    back, vids = bs.load_predictions(path)
    assert (vids == videos).all() and set(back) == set(bs._SAVED)
    for k in back:
        np.testing.assert_array_equal(back[k], a[k])
    # The file holds a whole accumulator: metrics (and smoothing) can be redone from it.
    acc = MetricAccumulator.from_state(("va", "expr", "au"), back)
    assert acc.compute() == MetricAccumulator.from_state(("va", "expr", "au"), a).compute()
    with pytest.raises(ValueError, match="missing"):
        MetricAccumulator.from_state(("va", "expr"), {"row_id": back["row_id"]})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a predictions file"):
        bs.load_predictions(path)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="version"):
        bs.load_predictions(tmp_path / "other.npz")


def test_fmt_ci():
    assert bs.fmt_ci(0.4123, [0.3712, 0.4551]) == "0.412 [0.371, 0.455]"
    assert bs.fmt_ci(0.04, [0.01, 0.07], signed=True) == "+0.040 [+0.010, +0.070]"
    assert bs.fmt_ci(None, None) == "—" and bs.fmt_ci(0.5, None) == "0.500"


def test_evaluation_writes_intervals_and_predictions(tmp_path):
    import json

    from affpipe.run.config import TrainConfig
    from affpipe.train.evaluate import report_evaluation

    a, videos = _fixture()
    acc = MetricAccumulator.from_state(("va", "expr", "au"), a)
    result = report_evaluation(acc, len(videos), TrainConfig.of(task="mtl"), tmp_path / "best.pt", {}, "val",
                               tune_au_thresholds=True, videos=videos)
    saved = json.loads((tmp_path / "eval.json").read_text())
    for key in ("va_ccc", "valence_ccc", "arousal_ccc", "expr_f1", "au_f1", "p_mtl"):
        lo, hi = saved["ci"][key]
        assert lo < saved[key] < hi, key  # the point value inside its own interval (this fixture)
    assert set(saved["ci"]["expr_f1_per_class"]) == set(result["expr_f1_per_class"])
    assert saved["ci_method"]["unit"] == "recording" and saved["ci_method"]["videos"] == 7
    assert "au_f1" in saved["tuned_ci"] and saved["predictions"] == "eval_predictions.npz"
    md = (tmp_path / "eval.md").read_text()
    assert f"| VA CCC (mean of valence, arousal) | {bs.fmt_ci(saved['va_ccc'], saved['ci']['va_ccc'])} |" in md
    assert "bootstrap over 7 recordings" in md and "few recordings (VA 7, EXPR 7, AU 7)" in md
    back, vids = bs.load_predictions(tmp_path / "eval_predictions.npz")
    again = bs.bootstrap_result(back, vids)
    assert again["ci"] == saved["ci"]  # the report recomputes exactly what evaluate stored


def test_a_single_video_gets_no_interval():
    a, videos = _fixture(videos=1)
    res = bs.bootstrap_result(a, videos)
    assert res["ci"] == {} and "single recording" in res["ci_method"]["note"]


def test_eval_md_says_which_tuned_figures_are_cross_validated():
    from affpipe.scoring.bootstrap import cross_validated_au
    from affpipe.train.evaluate import eval_markdown

    a, videos = _fixture()
    acc = MetricAccumulator.from_state(("va", "expr", "au"), a)
    thr = acc.tune_au_thresholds()
    tuned = acc.compute(au_thresholds=thr)
    result = {**acc.compute(), "task": "mtl", "split": "val", "au_thresholds": thr,
              "tuned": {"au_f1": tuned["au_f1"], "p_mtl": tuned["p_mtl"], "au_f1_per_au": tuned["au_f1_per_au"]},
              "cross_validated": cross_validated_au(acc, videos, 2, resamples=100)}
    md = eval_markdown(result)
    assert f"| AU macro F1 (thresholds tuned on the split: optimistic) | {tuned['au_f1']:.4f} |" in md
    cv = result["cross_validated"]
    assert (f"| AU macro F1 (AU thresholds tuned on the other folds: nested, 2 folds of recordings) | "
            f"{bs.fmt_ci(cv['au_f1'], cv['ci']['au_f1'])} |") in md
