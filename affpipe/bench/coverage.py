"""Coverage of the bootstrap intervals and false findings of recipe comparisons, by simulation.

A population of Aff-Wild2-like validation videos: each video has its own length, its own label
means (valence/arousal level, a Dirichlet mix of the 8 expressions around Aff-Wild2's imbalanced
class shares, its own AU base rates), labels held in sticky segments (expressions and AU states
last ~2 s), and a difficulty the model meets there (video-level bias in VA, accuracy in EXPR,
separation in AU, errors that stick for a segment). A *model* is a recipe plus a seed: the seed
shifts skill overall and per video.

- ``coverage``: how often the nominal 95% interval of VA CCC, EXPR F1, AU F1 and P_MTL of one fixed
  model, computed from ``n`` videos, contains the metric on a very large sample of the population
  (the target), for the percentile, BCa and studentized intervals.
- ``false_findings``: two recipes that are the same, each trained with ``seeds`` seeds, compared
  on the same ``n`` videos: how often the 95% interval of the difference excludes 0, pooling
  the seeds per resample (affpipe 0.3) vs the two-level bootstrap over seeds and videos.

``python -m affpipe.bench.coverage --reps 200`` prints the tables of BENCHMARKS.md (seeded).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from affpipe.labels import NUM_AU, NUM_EXPR
from affpipe.scoring import bootstrap as bs
from affpipe.scoring import intervals as iv

METRICS = ("va_ccc", "expr_f1", "au_f1", "p_mtl")
EXPR_SHARE = np.array([0.30, 0.03, 0.02, 0.025, 0.20, 0.10, 0.08, 0.245])
AU_RATE = np.array([0.15, 0.10, 0.15, 0.25, 0.35, 0.30, 0.30, 0.05, 0.05, 0.05, 0.60, 0.10])


@dataclass(frozen=True)
class Population:
    """The knobs of the simulated population (defaults: roughly Aff-Wild2's validation videos)."""

    mean_frames: float = 300.0  # Aff-Wild2 videos are ~10x longer; the per-video statistics are what matters
    segment: float = 60.0  # mean length of a sticky label segment, frames
    expr_concentration: float = 3.0  # Dirichlet concentration of a video's class mix around EXPR_SHARE
    difficulty_sd: float = 0.7  # video difficulty (logit scale), shared by every model
    seed_sd: float = 0.15  # a seed's overall skill shift (logit scale)
    seed_video_sd: float = 0.3  # a seed's per-video skill shift


def labels(rng: np.random.Generator, n: int, pop: Population) -> dict[str, np.ndarray]:
    """Frames of ``n`` videos with their labels, segment ids and per-video difficulty."""
    frames = np.clip(rng.lognormal(np.log(pop.mean_frames), 0.6, n), 40, 20 * pop.mean_frames).astype(np.int64)
    video = np.repeat(np.arange(n), frames)
    start = np.zeros(len(video), bool)
    start[np.concatenate([[0], np.cumsum(frames)[:-1]])] = True
    seg = np.cumsum(start | (rng.random(len(video)) < 1 / pop.segment)) - 1
    seg_video = video[np.flatnonzero(np.diff(np.concatenate([[-1], seg])))]
    n_seg = seg[-1] + 1
    mix = rng.dirichlet(pop.expr_concentration * EXPR_SHARE * len(EXPR_SHARE), n)  # [n, 8]
    cum = mix.cumsum(1)[seg_video]
    expr = (rng.random((n_seg, 1)) > cum).sum(1).clip(0, NUM_EXPR - 1)
    va_level = rng.normal([0.15, 0.3], 0.25, (n, 2))
    va = np.clip(va_level[video] + rng.normal(0, 0.2, (n_seg, 2))[seg] + rng.normal(0, 0.05, (len(video), 2)), -1, 1)
    logit = np.log(AU_RATE / (1 - AU_RATE)) + rng.normal(0, 1.2, (n, NUM_AU))
    au = rng.random((n_seg, NUM_AU)) < 1 / (1 + np.exp(-logit[seg_video]))
    return {"video": video, "seg": seg, "seg_video": seg_video, "difficulty": rng.normal(0, pop.difficulty_sd, n),
            "va": va.astype(np.float32), "expr": expr[seg], "au": au[seg]}


def predict(rng: np.random.Generator, lab: dict[str, np.ndarray], pop: Population, *, shift: float = 0.0,
            video_shift: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A model's predictions on ``lab`` (``shift``/``video_shift``: the seed's skill offsets)."""
    v, seg = lab["video"], lab["seg"]
    skill = lab["difficulty"] + shift + (0 if video_shift is None else video_shift)  # per video, logit scale
    q = 1 / (1 + np.exp(-(skill - 0.3)))  # [0, 1] quality
    n, n_seg = len(v), seg[-1] + 1
    bias = rng.normal(0, 0.15, (len(skill), 2))
    va = (0.4 + 0.4 * q[v, None]) * lab["va"] + bias[v] + rng.normal(0, 0.15, (n_seg, 2))[seg]
    va = np.clip(va + rng.normal(0, 0.05, (n, 2)), -1, 1)
    right = (rng.random(n_seg) < q[lab["seg_video"]])[seg] & (rng.random(n) > 0.1)
    wrong = (rng.random((n, 1)) > np.array([0.45, 0.5, 0.52, 0.55, 0.7, 0.8, 0.85, 1.0])).sum(1).clip(0, 7)
    expr = np.where(right, lab["expr"], wrong)
    sep = (0.2 + 1.5 * q[v])[:, None] * (2 * lab["au"] - 1)
    logits = sep + rng.normal(0, 0.5, (len(skill), NUM_AU))[v] + rng.normal(0, 0.8, (n_seg, NUM_AU))[seg]
    prob = 1 / (1 + np.exp(-(logits + rng.normal(0, 0.5, (n, NUM_AU)))))
    return {"va_pred": va, "va_target": lab["va"], "va_mask": np.ones(n, bool), "expr_pred": expr,
            "expr_target": lab["expr"], "expr_mask": np.ones(n, bool), "au_prob": prob.astype(np.float32),
            "au_target": lab["au"].astype(np.int8), "au_mask": np.ones((n, NUM_AU), bool)}


def _scalar(stats: bs.VideoStats, w: np.ndarray) -> dict[str, np.ndarray]:
    out = bs.metrics_from_stats(stats, w)
    return {k: out[k] for k in METRICS}


def target(pop: Population, videos: int = 4000, seed: int = 1) -> dict[str, float]:
    """The metrics of the fixed model on a very large sample of the population (in chunks)."""
    rng = np.random.default_rng([seed, 0xC0DE])
    parts = []
    for _ in range(0, videos, 500):
        lab = labels(rng, 500, pop)
        parts.append(bs.video_stats(predict(rng, lab, pop), lab["video"].astype(str), unit="video"))
    total = bs.VideoStats(videos=np.array(["all"]), **{t: sum(p.__dict__[t].sum(0, keepdims=True) for p in parts)
                                                       for t in ("va", "expr", "au")})
    return {k: float(v[0]) for k, v in _scalar(total, np.ones((1, 1))).items()}


def coverage(sizes: Sequence[int], reps: int, *, resamples: int = 500, seed: int = 0,
             pop: Population = Population(), truth: dict[str, float] | None = None) -> dict[str, dict]:
    """``{n: {method: {metric: coverage}}}`` of nominal 95% intervals over ``reps`` replications."""
    truth = truth or target(pop)
    out: dict[str, dict] = {}
    for n in sizes:
        rng = np.random.default_rng([seed, n])
        hits = {m: {k: 0 for k in METRICS} for m in iv.METHODS}
        width = {m: {k: 0.0 for k in METRICS} for m in iv.METHODS}
        for r in range(reps):
            lab = labels(rng, n, pop)
            stats = bs.video_stats(predict(rng, lab, pop), lab["video"].astype(str), unit="video")
            w = bs.resample_weights(n, resamples, seed=r)
            for how in iv.METHODS:
                b = bs.interval_bounds(stats, w, how=how, keys=METRICS)
                for k in METRICS:
                    lo, hi = b[k]
                    hits[how][k] += bool(lo <= truth[k] <= hi)
                    width[how][k] += float(hi - lo) / reps
        out[str(n)] = {m: {k: hits[m][k] / reps for k in METRICS} for m in iv.METHODS}
        out[str(n)]["mean_width_" + iv.DEFAULT_METHOD] = width[iv.DEFAULT_METHOD]
    return {"truth": truth, "coverage": out}


def false_findings(n: int, seeds: Sequence[int], reps: int, *, resamples: int = 500, seed: int = 0,
                   pop: Population = Population()) -> dict[str, dict]:
    """Two identical recipes with ``s`` seeds each (for each ``s`` of ``seeds``), compared on ``n``
    videos: the share of replications whose 95% interval of the difference excludes 0, with the
    seeds pooled per resample (affpipe 0.3) and with the two-level bootstrap."""
    out: dict[str, dict] = {}
    for s in seeds:
        rng = np.random.default_rng([seed, s, 0xFA15E])
        count = {"pooled": dict.fromkeys(METRICS, 0), "two_level": dict.fromkeys(METRICS, 0)}
        for r in range(reps):
            lab = labels(rng, n, pop)
            w = bs.point_and_resamples(n, resamples, seed=r)
            sides = []
            for _recipe in range(2):
                per = [_scalar(bs.video_stats(predict(rng, lab, pop, shift=rng.normal(0, pop.seed_sd),
                                                      video_shift=rng.normal(0, pop.seed_video_sd, n)),
                                              lab["video"].astype(str), unit="video"), w) for _ in range(s)]
                sides.append(per)
            for k in METRICS:
                a, b = (np.mean([p[k] for p in side], 0) for side in sides)
                count["pooled"][k] += bs.difference(a, b)["excludes_zero"]
                d = iv.two_level([p[k] for p in sides[0]], [p[k] for p in sides[1]], seed=r)
                lo, hi = np.nanquantile(d[1:], [0.025, 0.975])
                count["two_level"][k] += bool(lo > 0 or hi < 0)
        out[str(s)] = {how: {k: c / reps for k, c in v.items()} for how, v in count.items()}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--resamples", type=int, default=500)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 30, 70, 145])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--compare-videos", type=int, default=70)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    cov = coverage(a.sizes, a.reps, resamples=a.resamples, seed=a.seed)
    t1 = time.perf_counter()
    ff = false_findings(a.compare_videos, a.seeds, a.reps, resamples=a.resamples, seed=a.seed)
    print(json.dumps({**cov, "false_findings": {"videos": a.compare_videos, **ff}, "reps": a.reps,
                      "resamples": a.resamples, "seconds": {"coverage": t1 - t0, "false_findings": time.perf_counter() - t1}},
                     indent=1))


if __name__ == "__main__":
    main()
