"""Which interval, how far to trust it, and how many claims a table makes.

``scoring.bootstrap`` draws the resamples (recordings, see ``recording_of``); this module turns the
resampled metrics into intervals and decisions:

- ``ci_bounds``: the percentile, BCa (bias-corrected and accelerated, acceleration by the
  jackknife over recordings) or studentized (bootstrap-t, each resample's standard error by the
  jackknife over its own draws) interval. All three are exact functions of the per-recording
  sufficient statistics, so a jackknife is one more weight matrix. Which one is the default, and
  below how many recordings every one of them under-covers, was measured by
  ``affpipe.bench.coverage`` (BENCHMARKS.md, "Coverage of the intervals").
- ``two_level``: a paired difference that resamples seeds as well as videos, so seed-to-seed
  variation of a recipe is part of the interval instead of being read as a recipe effect.
- ``p_value`` / ``holm``: the bootstrap p-value of a difference (the level at which its
  percentile interval would touch 0) and Holm's step-down adjustment over the claims of a table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

METHODS = ("percentile", "bca", "studentized")
# Measured by affpipe.bench.coverage (BENCHMARKS.md, "Coverage of the intervals"): the studentized
# interval covered best at every size (10 videos: EXPR F1 0.88 vs BCa 0.55, percentile 0.46), and at
# 70 recordings it was the first size where every metric covered >= 0.92 (30: EXPR F1 0.88).
DEFAULT_METHOD = "studentized"
MIN_RECORDINGS = 70

_N = NormalDist()
_ncdf = np.vectorize(_N.cdf, otypes=[float])


def _ppf(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return np.vectorize(_N.inv_cdf, otypes=[float])(p)


def jackknife_weights(n: int) -> np.ndarray:
    """``[n, n]``: row i leaves recording i out."""
    return np.ones((n, n)) - np.eye(n)


def _quantile(values: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per column of ``values [B, ...]``, the quantile ``q [2, ...]`` (NaN resamples left out)."""
    out = np.full(q.shape, np.nan)
    flat_v = values.reshape(len(values), -1)
    flat_q = q.reshape(2, -1)
    res = out.reshape(2, -1)
    for j in range(flat_v.shape[1]):
        v = flat_v[:, j]
        v = v[np.isfinite(v)]
        if len(v) and np.isfinite(flat_q[:, j]).all():
            res[:, j] = np.quantile(v, flat_q[:, j])
    return out


def ci_bounds(point: np.ndarray, boot: np.ndarray, level: float, method: str = DEFAULT_METHOD, *,
              jack: np.ndarray | None = None, boot_se: np.ndarray | None = None) -> np.ndarray:
    """``[2, ...]`` interval bounds of a metric with full-sample value ``point [...]`` and resampled
    values ``boot [B, ...]``. ``bca`` needs ``jack [V, ...]`` (leave-one-recording-out values),
    ``studentized`` needs ``boot_se [B, ...]`` (each resample's jackknife standard error) and
    ``jack`` (for the full sample's). Where the extra terms are undefined (NaN), the percentile
    interval is used."""
    alpha = (1 - level) / 2
    point = np.asarray(point, np.float64)
    base = np.broadcast_to(np.array([alpha, 1 - alpha]).reshape((2,) + (1,) * point.ndim), (2,) + point.shape)
    if method == "percentile":
        return _quantile(boot, base)
    if method not in METHODS:
        raise ValueError(f"interval method must be one of {', '.join(METHODS)}, got {method!r}")
    if jack is None:
        raise ValueError(f"{method} intervals need the jackknife values")
    if method == "bca":
        with np.errstate(invalid="ignore", divide="ignore"):
            finite = np.isfinite(boot)
            below = np.where(finite, (boot < point) + 0.5 * (boot == point), 0).sum(0) / np.maximum(finite.sum(0), 1)
            z0 = _ppf(below)
            d = np.nanmean(jack, 0) - jack
            a = np.nansum(d ** 3, 0) / (6 * np.nansum(d ** 2, 0) ** 1.5)
            a = np.where(np.isfinite(a), a, 0.0)
            z = _ppf(base)
            q = _ncdf(z0 + (z0 + z) / (1 - a * (z0 + z)))
        q = np.where(np.isfinite(q), q, base)
        return _quantile(boot, q)
    if boot_se is None:
        raise ValueError("studentized intervals need each resample's standard error")
    se = jackknife_se(jack)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(boot_se > 0, (boot - point) / np.where(boot_se > 0, boot_se, 1), np.nan)
    tq = _quantile(t, base)
    out = np.stack([point - tq[1] * se, point - tq[0] * se])
    fallback = _quantile(boot, base)
    return np.where(np.isfinite(out) & (se > 0), out, fallback)


def jackknife_se(jack: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Jackknife standard error from leave-one-out values ``jack [V, ...]`` (``counts [V]``: how often
    each left-out unit occurs in the sample, for a resample with repeats)."""
    c = np.ones(len(jack)) if counts is None else np.asarray(counts, np.float64)
    c = c.reshape((-1,) + (1,) * (jack.ndim - 1))
    n = c.sum()
    with np.errstate(invalid="ignore"):
        mean = (c * jack).sum(0) / n
        return np.sqrt((n - 1) / n * (c * (jack - mean) ** 2).sum(0))


def resample_se(metric: Callable[[np.ndarray], dict[str, np.ndarray]], weights: np.ndarray,
                chunk: int = 64) -> dict[str, np.ndarray]:
    """``{key: [B, ...]}``: the jackknife standard error of each of ``metric``'s values within each
    resample (row of ``weights [B, V]``): drop one draw of each drawn recording, counted as often as
    it was drawn (undrawn recordings weigh 0)."""
    out: dict[str, list[np.ndarray]] = {}
    v = weights.shape[1]
    for start in range(0, len(weights), chunk):
        w = weights[start:start + chunk]
        rows = np.maximum((w[:, None, :] - np.eye(v)[None]).reshape(-1, v), 0)  # [b*V, V]
        for key, vals in metric(rows).items():
            vals = vals.reshape((len(w), v) + vals.shape[1:])
            out.setdefault(key, []).extend(jackknife_se(vals[i], w[i]) for i in range(len(w)))
    return {k: np.stack(x) for k, x in out.items()}


def p_value(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a difference from its resampled values: twice the smaller
    share of resamples on either side of 0 (the level at which the percentile interval touches 0)."""
    d = np.asarray(diffs, np.float64)
    d = d[np.isfinite(d)]
    if not len(d):
        return float("nan")
    return float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error over all of ``pvalues``; NaN stays NaN)."""
    p = np.asarray(pvalues, np.float64)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(len(p), np.nan)
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out.tolist()


def multiplicity(rows: Sequence[dict[str, Any]], level: float = 0.95) -> dict[str, Any]:
    """Holm over the rows that have an interval: sets each row's ``p`` and ``p_holm`` and
    ``holds`` (excludes 0 after the adjustment); returns the counts for the multiplicity line."""
    scored = [r for r in rows if r.get("ci") and r.get("p") is not None and math.isfinite(r["p"])]
    for r, adj in zip(scored, holm([r["p"] for r in scored]), strict=True):
        r["p_holm"], r["holds"] = adj, bool(adj < 1 - level)
    return {"examined": len(scored), "exclude_zero": sum(bool(r.get("excludes_zero")) for r in scored),
            "hold_holm": sum(r.get("holds", False) for r in scored)}


def multiplicity_line(counts: dict[str, Any]) -> str:
    """``3 intervals examined, 1 excludes 0; after Holm's adjustment over the 3: 0 hold.``"""
    m = counts["examined"]
    if not m:
        return ""
    return (f"Multiplicity: {m} interval{'s' if m != 1 else ''} examined, {counts['exclude_zero']} exclude"
            f"{'s' if counts['exclude_zero'] == 1 else ''} 0; after Holm's adjustment over the {m}: "
            f"{counts['hold_holm']} hold{'s' if counts['hold_holm'] == 1 else ''}.")


def seed_draws(n_seeds: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``[1 + B, n_seeds]`` seed indices: row 0 every seed once (the point value), then each
    resample draws ``n_seeds`` seeds with replacement (the outer level of ``two_level``)."""
    first = np.arange(n_seeds)[None]
    return np.vstack([first, rng.integers(0, n_seeds, (resamples, n_seeds))])


def two_level(per_seed_a: Sequence[np.ndarray], per_seed_b: Sequence[np.ndarray], *, seed: int = 0) -> np.ndarray:
    """``[1 + B]`` resampled ``a − b`` where each side's value per resample is the mean over seeds
    drawn with replacement of that seed's metric at the resample's video weights (``per_seed_x[s]``:
    ``[1 + B]``, row 0 the full split). Seeds are the outer level, videos the inner, and the same
    video weights serve both sides (paired). One seed per side reduces to the paired bootstrap."""
    rng = np.random.default_rng([seed, 0x5EED])
    sides = []
    for per in (per_seed_a, per_seed_b):
        m = np.stack(per)  # [S, 1 + B]
        idx = seed_draws(len(m), m.shape[1] - 1, rng)  # [1 + B, S]
        sides.append(m[idx, np.arange(m.shape[1])[:, None]].mean(1))
    return sides[0] - sides[1]
