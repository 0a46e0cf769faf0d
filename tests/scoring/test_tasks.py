"""Masked multi-task losses: reference values, exact masking, zero gradients, weights from the table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from affpipe.labels import AU_NAMES, FRAMES_SCHEMA
from affpipe.scoring.metrics import ccc
from affpipe.scoring.tasks import (
    LossConfig,
    MultiTaskLoss,
    au_pos_weights,
    expr_class_weights,
    label_statistics,
)

ALL = ("va", "expr", "au")


def _toy_table() -> pa.Table:
    # 8 train rows + 2 val rows; AU1 is 1 on rows 0-1, AU2 is never 1, AU4 is 1 on 5 of 6 valid rows.
    n = 10
    split = ["train"] * 8 + ["val"] * 2
    expr = [0, 0, 0, 0, 1, 1, -1, 4, 5, 5]
    au = {a: [-1] * n for a in AU_NAMES}
    au_valid = [True] * 6 + [False, False, True, True]
    au["AU1"] = [1, 1, 0, 0, 0, 0, -1, -1, 1, 1]
    au["AU2"] = [0, 0, 0, 0, 0, -1, -1, -1, 1, 1]
    au["AU4"] = [1, 1, 1, 1, 1, 0, -1, -1, 0, 0]
    va_valid = [True, True, True, False, False, True, True, True, True, True]
    cols = {
        "row_id": list(range(n)), "video": ["v"] * n, "frame": list(range(1, n + 1)), "split": split,
        "image": [f"v/{i:05d}.jpg" for i in range(1, n + 1)], "image_root": [0] * n, "has_image": [True] * n,
        "valence": [0.1 if v else float("nan") for v in va_valid], "arousal": [0.2 if v else float("nan") for v in va_valid],
        "va_valid": va_valid, "expr": expr, "expr_valid": [e >= 0 for e in expr], **au, "au_valid": au_valid,
    }
    return pa.Table.from_pydict(cols, schema=FRAMES_SCHEMA)


def test_label_statistics_and_weights_on_toy_table():
    stats = label_statistics(_toy_table())
    assert stats["rows"] == 8 and stats["va_count"] == 6
    assert stats["expr_counts"] == [4, 2, 0, 0, 1, 0, 0, 0]
    assert stats["au_pos"][:3] == [2, 0, 5] and stats["au_neg"][:3] == [4, 5, 1]
    assert stats["au_pos"][3:] == [0] * 9 and stats["au_neg"][3:] == [0] * 9
    assert label_statistics(_toy_table(), split=None)["expr_counts"] == [4, 2, 0, 0, 1, 2, 0, 0]

    w = expr_class_weights(stats)
    inv = np.array([1 / 4, 1 / 2, 0, 0, 1, 0, 0, 0])
    expected = inv / inv[[0, 1, 4]].mean()  # mean 1 over the present classes, absent → 0
    assert w.tolist() == pytest.approx(expected.tolist())
    assert w[[0, 1, 4]].mean().item() == pytest.approx(1.0)

    pw = au_pos_weights(stats)
    # 4/2 = 2; no positive → clipped to 50; 1/5 → clipped to 1; no label at all → 1
    assert pw.tolist() == pytest.approx([2.0, 50.0, 1.0] + [1.0] * 9)


def _batch(rng: np.random.Generator, n: int = 16) -> dict[str, torch.Tensor]:
    return {
        "va": torch.tensor(rng.uniform(-1, 1, (n, 2)), dtype=torch.float32),
        "expr": torch.tensor(rng.integers(0, 8, n)),
        "au": torch.tensor((rng.random((n, 12)) < 0.3).astype(np.float32)),
        "va_mask": torch.tensor(rng.random(n) < 0.6),
        "expr_mask": torch.tensor(rng.random(n) < 0.6),
        "au_mask": torch.tensor(rng.random((n, 12)) < 0.7),
        "row_id": torch.arange(n),
    }


def _outputs(rng: np.random.Generator, n: int = 16) -> dict[str, torch.Tensor]:
    return {
        "va": torch.tanh(torch.tensor(rng.normal(0, 1, (n, 2)), dtype=torch.float32)).requires_grad_(),
        "expr": torch.tensor(rng.normal(0, 1, (n, 8)), dtype=torch.float32, requires_grad=True),
        "au": torch.tensor(rng.normal(0, 1, (n, 12)), dtype=torch.float32, requires_grad=True),
    }


STATS = label_statistics(_toy_table(), split=None)


def test_reference_values_with_all_labels_valid():
    rng = np.random.default_rng(0)
    b, o = _batch(rng), _outputs(rng)
    for k in ("va_mask", "expr_mask", "au_mask"):
        b[k] = torch.ones_like(b[k])
    loss = MultiTaskLoss(ALL, LossConfig(va_loss="mse"), STATS)(o, b)
    assert loss["loss_va"].item() == pytest.approx(F.mse_loss(o["va"], b["va"]).item(), rel=1e-6)
    ce = F.cross_entropy(o["expr"], b["expr"], weight=expr_class_weights(STATS))
    assert loss["loss_expr"].item() == pytest.approx(ce.item(), rel=1e-6)
    bce = F.binary_cross_entropy_with_logits(o["au"], b["au"], pos_weight=au_pos_weights(STATS))
    assert loss["loss_au"].item() == pytest.approx(bce.item(), rel=1e-6)
    assert loss["loss"].item() == pytest.approx((loss["loss_va"] + loss["loss_expr"] + loss["loss_au"]).item(), rel=1e-6)
    ccc_loss = MultiTaskLoss(("va",), LossConfig(va_loss="ccc"))(o, b)["loss_va"].item()
    p, t = o["va"].detach().numpy(), b["va"].numpy()
    assert ccc_loss == pytest.approx(1 - (ccc(p[:, 0], t[:, 0]) + ccc(p[:, 1], t[:, 1])) / 2, abs=1e-5)
    weighted = MultiTaskLoss(ALL, LossConfig(va_loss="mse", task_weights=(2.0, 0.5, 0.0)), STATS)(o, b)
    assert weighted["loss"].item() == pytest.approx((2 * loss["loss_va"] + 0.5 * loss["loss_expr"]).item(), rel=1e-6)


@pytest.mark.parametrize("va_loss", ["ccc", "mse"])
@pytest.mark.parametrize("weighting", ["fixed", "uncertainty"])
def test_masked_labels_do_not_change_the_loss(va_loss, weighting):
    rng = np.random.default_rng(1)
    b, o = _batch(rng), _outputs(rng)
    fn = MultiTaskLoss(ALL, LossConfig(va_loss=va_loss, task_weighting=weighting), STATS)
    ref = fn(o, b)
    b2 = dict(b)
    b2["va"] = torch.where(b["va_mask"][:, None], b["va"], torch.full_like(b["va"], float("nan")))
    b2["expr"] = torch.where(b["expr_mask"], b["expr"], torch.full_like(b["expr"], -1))
    b2["au"] = torch.where(b["au_mask"], b["au"], torch.full_like(b["au"], -1.0))
    got = fn(o, b2)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    # and the gradient reaching a masked output is exactly zero
    got["loss"].backward()
    assert torch.all(o["expr"].grad[~b["expr_mask"]] == 0)
    assert torch.all(o["au"].grad[~b["au_mask"]] == 0)
    assert o["au"].grad[b["au_mask"]].abs().sum() > 0


@pytest.mark.parametrize("weighting", ["fixed", "uncertainty"])
def test_all_invalid_head_gets_zero_gradient(weighting):
    from affpipe.models.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(tasks=ALL))
    fn = MultiTaskLoss(ALL, LossConfig(va_loss="ccc", task_weighting=weighting), STATS)
    rng = np.random.default_rng(2)
    b = _batch(rng, 4)
    b["expr_mask"][:] = False
    b["va_mask"][:] = torch.tensor([False, True, False, False])  # one VA frame: CCC undefined → no loss
    out = fn(model(torch.randn(4, 3, 32, 32)), b)
    assert out["loss_expr"].item() == 0.0 and out["loss_va"].item() == 0.0
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for task in ("va", "expr"):
        for p in model.heads[task].parameters():
            assert p.grad is not None and torch.all(p.grad == 0), task
    assert model.heads["au"].weight.grad.abs().sum() > 0
    if weighting == "uncertainty":
        assert fn.log_vars.grad[:2].tolist() == [0.0, 0.0] and fn.log_vars.grad[2] != 0


def test_empty_batch_head_is_zero_without_nan():
    rng = np.random.default_rng(3)
    b, o = _batch(rng, 5), _outputs(rng, 5)
    for k in ("va_mask", "expr_mask", "au_mask"):
        b[k] = torch.zeros_like(b[k])
    for va_loss in ("ccc", "mse"):
        out = MultiTaskLoss(ALL, LossConfig(va_loss=va_loss, task_weighting="uncertainty"), STATS)(o, b)
        assert out["loss"].item() == 0.0
        out["loss"].backward()
        for t in ALL:
            assert torch.all(o[t].grad == 0)


def test_uncertainty_weighting_learns():
    rng = np.random.default_rng(4)
    fn = MultiTaskLoss(ALL, LossConfig(task_weighting="uncertainty"), STATS)
    params = list(fn.parameters())
    assert len(params) == 1 and params[0].shape == (3,) and params[0].requires_grad
    assert list(MultiTaskLoss(ALL, LossConfig(), STATS).parameters()) == []
    opt = torch.optim.SGD(fn.parameters(), lr=0.1)
    before = fn.log_vars.detach().clone()
    out = fn(_outputs(rng), _batch(rng))
    assert {"weight_va", "weight_expr", "weight_au", "log_var_va"} <= set(out)
    out["loss"].backward()
    opt.step()
    assert not torch.equal(fn.log_vars.detach(), before)


def test_loss_config_validation_and_buffers():
    with pytest.raises(ValueError):
        LossConfig(va_loss="l1")
    with pytest.raises(ValueError):
        LossConfig(task_weighting="gradnorm")
    with pytest.raises(ValueError):
        LossConfig(task_weights=(1.0, 1.0))
    assert LossConfig(task_weights=[1, 2, 3]).task_weights == (1.0, 2.0, 3.0)
    fn = MultiTaskLoss(("expr", "au"), LossConfig(), STATS)
    assert fn.class_weight.shape == (8,) and fn.pos_weight.shape == (12,)
    assert "class_weight" in fn.state_dict()
    assert MultiTaskLoss(("expr",), LossConfig(expr_class_weights=False), STATS).class_weight is None
