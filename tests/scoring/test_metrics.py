"""Metrics against scikit-learn and direct formulas; the accumulator's masks, thresholds, DDP gather."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from affpipe.labels import AU_NAMES, EXPR_CLASSES
from affpipe.scoring.metrics import MetricAccumulator, au_f1, ccc, expr_f1, p_mtl, va_ccc


def _ccc_ref(x: np.ndarray, y: np.ndarray) -> float:
    # The organisers' formula, written out independently.
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rho = np.corrcoef(x, y)[0, 1]
    return 2 * rho * x.std() * y.std() / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def test_ccc_matches_formula_and_known_cases():
    rng = np.random.default_rng(0)
    y = rng.uniform(-1, 1, 500)
    x = 0.6 * y + rng.normal(0, 0.3, 500)
    assert ccc(x, y) == pytest.approx(_ccc_ref(x, y), abs=1e-12)
    assert ccc(y, y) == pytest.approx(1.0)
    yc = y - y.mean()  # negation is perfect discordance only about a zero mean
    assert ccc(-yc, yc) == pytest.approx(-1.0)
    assert -1.0 < ccc(-y, y) < -0.9
    # A constant shift keeps the correlation but lowers the concordance.
    assert ccc(y + 0.5, y) < ccc(y, y)
    assert ccc(y + 0.5, y) == pytest.approx(_ccc_ref(y + 0.5, y))
    # torch input, float32 — same value.
    assert ccc(torch.tensor(x, dtype=torch.float32), torch.tensor(y)) == pytest.approx(ccc(x, y), abs=1e-6)
    assert np.isnan(ccc([], []))
    assert ccc([0.3, 0.3], [0.3, 0.3]) == 1.0
    with pytest.raises(ValueError):
        ccc([1, 2], [1, 2, 3])


def test_va_ccc_columns():
    rng = np.random.default_rng(1)
    t = rng.uniform(-1, 1, (200, 2))
    p = t + rng.normal(0, 0.2, (200, 2))
    out = va_ccc(p, t)
    assert out["valence_ccc"] == pytest.approx(_ccc_ref(p[:, 0], t[:, 0]))
    assert out["arousal_ccc"] == pytest.approx(_ccc_ref(p[:, 1], t[:, 1]))
    assert out["va_ccc"] == pytest.approx((out["valence_ccc"] + out["arousal_ccc"]) / 2)


@pytest.mark.parametrize("seed", range(5))
def test_expr_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    # Few classes in play so some are absent from both pred and target (they count as 0).
    classes = rng.choice(8, size=int(rng.integers(1, 9)), replace=False)
    t, p = rng.choice(classes, n), rng.choice(classes, n)
    agree = rng.random(n) < 0.5  # some true positives
    p[agree] = t[agree]
    macro, per = expr_f1(p, t)
    ref = f1_score(t, p, labels=list(range(8)), average=None, zero_division=0)
    assert per == pytest.approx(ref.tolist())
    assert macro == pytest.approx(f1_score(t, p, labels=list(range(8)), average="macro", zero_division=0))
    assert len(per) == 8


def test_expr_f1_rejects_invalid_labels():
    with pytest.raises(ValueError):
        expr_f1([0, 1], [0, -1])


@pytest.mark.parametrize("seed", range(4))
def test_au_f1_matches_sklearn_per_au_with_mask(seed):
    rng = np.random.default_rng(seed)
    n = 400
    t = (rng.random((n, 12)) < rng.uniform(0.02, 0.6, 12)).astype(np.int8)
    p = (rng.random((n, 12)) < 0.3).astype(np.int8)
    mask = rng.random((n, 12)) < 0.8
    mask[:, 3] = False  # an AU no frame annotates (ABAW1 files have 7 of the 12) is not scored
    t_garbage = np.where(mask, t, 1)  # masked entries must not count, whatever their value
    macro, per = au_f1(p, t_garbage, mask)
    ref = [f1_score(t[mask[:, j], j], p[mask[:, j], j], zero_division=0) if mask[:, j].any() else np.nan for j in range(12)]
    assert per == pytest.approx(ref, nan_ok=True)
    assert np.isnan(per[3])
    assert macro == pytest.approx(np.nanmean(ref))  # the macro mean is over the 11 annotated AUs
    # Unmasked equals sklearn's binary F1 per column.
    _, per_all = au_f1(torch.tensor(p), torch.tensor(t))
    assert per_all == pytest.approx([f1_score(t[:, j], p[:, j], zero_division=0) for j in range(12)])


def test_p_mtl():
    assert p_mtl(0.5, 0.3, 0.4) == pytest.approx(1.2)


def _batch(rng, n, row0=0):
    va = torch.tensor(rng.uniform(-1, 1, (n, 2)), dtype=torch.float32)
    expr = torch.tensor(rng.integers(0, 8, n))
    au = torch.tensor((rng.random((n, 12)) < 0.3).astype(np.float32))
    return {
        "va": va, "expr": expr, "au": au,
        "va_mask": torch.tensor(rng.random(n) < 0.7),
        "expr_mask": torch.tensor(rng.random(n) < 0.6),
        "au_mask": torch.tensor(rng.random((n, 12)) < 0.8),
        "row_id": torch.arange(row0, row0 + n),
    }


def _outputs(rng, n):
    return {
        "va": torch.tensor(rng.uniform(-1, 1, (n, 2)), dtype=torch.float32),
        "expr": torch.tensor(rng.normal(0, 1, (n, 8)), dtype=torch.float32),
        "au": torch.tensor(rng.normal(0, 1.5, (n, 12)), dtype=torch.float32),
    }


def test_accumulator_matches_functions_and_respects_masks():
    rng = np.random.default_rng(3)
    acc = MetricAccumulator(("va", "expr", "au"))
    batches, outs = [], []
    for i in range(3):
        b, o = _batch(rng, 50, row0=50 * i), _outputs(rng, 50)
        acc.update(o, b)
        batches.append(b)
        outs.append(o)
    cat = lambda k, src: torch.cat([s[k] for s in src]).numpy()  # noqa: E731
    m = cat("va_mask", batches)
    res = acc.compute()
    assert res["va_ccc"] == pytest.approx(va_ccc(cat("va", outs)[m], cat("va", batches)[m])["va_ccc"], abs=1e-6)
    assert res["n_va"] == int(m.sum())
    em = cat("expr_mask", batches)
    pred = cat("expr", outs).argmax(1)
    assert res["expr_f1"] == pytest.approx(
        f1_score(cat("expr", batches)[em], pred[em], labels=list(range(8)), average="macro", zero_division=0)
    )
    assert list(res["expr_f1_per_class"]) == list(EXPR_CLASSES)
    am = cat("au_mask", batches)
    au_pred = cat("au", outs) >= 0.0  # sigmoid >= 0.5
    assert res["au_f1"] == pytest.approx(au_f1(au_pred, cat("au", batches), am)[0])
    assert list(res["au_f1_per_au"]) == list(AU_NAMES)
    assert res["p_mtl"] == pytest.approx(res["va_ccc"] + res["expr_f1"] + res["au_f1"])

    # Changing labels under the masks changes nothing.
    acc2 = MetricAccumulator(("va", "expr", "au"))
    for b, o in zip(batches, outs, strict=True):
        b2 = dict(b)
        b2["va"] = torch.where(b["va_mask"][:, None], b["va"], torch.full_like(b["va"], 0.9))
        b2["expr"] = torch.where(b["expr_mask"], b["expr"], torch.full_like(b["expr"], 3))
        b2["au"] = torch.where(b["au_mask"], b["au"], torch.ones_like(b["au"]))
        acc2.update(o, b2)
    assert acc2.compute() == res

    pred_files = acc.predictions()
    assert pred_files["row_id"].tolist() == list(range(150))
    assert pred_files["va"].shape == (150, 2) and pred_files["expr"].shape == (150,)
    assert pred_files["au"].shape == (150, 12) and pred_files["expr_prob"].shape == (150, 8)


def test_accumulator_uni_task_has_only_its_keys():
    rng = np.random.default_rng(4)
    acc = MetricAccumulator(("expr",))
    acc.update({"expr": _outputs(rng, 20)["expr"]}, _batch(rng, 20))
    res = acc.compute()
    assert "expr_f1" in res and "p_mtl" not in res and "va_ccc" not in res and "au_f1" not in res


def test_tune_au_thresholds_improves_f1():
    rng = np.random.default_rng(5)
    n = 2000
    t = (rng.random((n, 12)) < 0.15).astype(np.float32)
    # Probabilities skewed low: the F1-optimal threshold is well below 0.5.
    prob = np.clip(0.25 * t + rng.uniform(0, 0.3, (n, 12)), 1e-4, 1 - 1e-4)
    logits = torch.tensor(np.log(prob / (1 - prob)), dtype=torch.float32)
    batch = _batch(rng, n)
    batch["au"] = torch.tensor(t)
    acc = MetricAccumulator(("au",))
    acc.update({"au": logits}, batch)
    thr = acc.tune_au_thresholds()
    assert len(thr) == 12 and all(0.05 <= x <= 0.95 for x in thr)
    tuned = acc.compute(au_thresholds=thr)["au_f1"]
    assert tuned > acc.compute()["au_f1"]
    # Each chosen threshold is the best on the grid for its AU.
    a, m = acc.state(), batch["au_mask"].numpy()
    for j in (0, 7):
        scores = [f1_score(t[m[:, j], j], a["au_prob"][m[:, j], j] >= g) for g in np.linspace(0.05, 0.95, 19)]
        assert f1_score(t[m[:, j], j], a["au_prob"][m[:, j], j] >= thr[j]) == pytest.approx(max(scores))


def test_all_reduce_single_process_is_noop():
    rng = np.random.default_rng(6)
    acc = MetricAccumulator(("va",))
    acc.update({"va": _outputs(rng, 10)["va"]}, _batch(rng, 10))
    before = acc.compute()
    acc.all_reduce()
    assert acc.compute() == before and len(acc) == 10


def test_all_reduce_gathers_and_dedupes(monkeypatch):
    import torch.distributed as dist

    rng = np.random.default_rng(7)
    rank0, rank1 = MetricAccumulator(("va", "au")), MetricAccumulator(("va", "au"))
    b0, b1 = _batch(rng, 30, row0=0), _batch(rng, 30, row0=25)  # rows 25..29 on both ranks
    o0, o1 = _outputs(rng, 30), _outputs(rng, 30)
    rank0.update(o0, b0)
    rank1.update(o1, b1)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)

    def fake_gather(out, obj, group=None):
        out[0], out[1] = obj, rank1.state()

    monkeypatch.setattr(dist, "all_gather_object", fake_gather)
    rank0.all_reduce()
    assert rank0.predictions()["row_id"].tolist() == list(range(55))
    assert len(rank0) == 55
