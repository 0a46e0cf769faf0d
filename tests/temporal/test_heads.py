import pytest
import torch

from affpipe.run.config import TemporalConfig
from affpipe.temporal.heads import build_head, load_frame_heads


@pytest.mark.parametrize("arch", ["tcn", "transformer"])
def test_heads_give_per_frame_outputs_that_use_context(arch):
    torch.manual_seed(0)
    cfg = TemporalConfig(arch=arch, window=16, hidden=32, layers=2, attention_heads=4)
    head = build_head(8, cfg, ("va", "expr", "au")).eval()
    for layer in head.out.context.values():  # zero-initialized: give the context a say
        torch.nn.init.normal_(layer.weight)
    x, m = torch.randn(3, 16, 8), torch.ones(3, 16, dtype=torch.bool)
    m[1, :4] = False
    m[2] = False  # a window without any frame must not produce NaN
    out = head(x, m)
    assert out["va"].shape == (3, 16, 2) and out["expr"].shape == (3, 16, 8) and out["au"].shape == (3, 16, 12)
    assert all(torch.isfinite(v).all() for v in out.values()) and out["va"].abs().max() <= 1
    x2 = x.clone()
    x2[0, 9] = torch.randn(8) * 3
    assert not torch.allclose(head(x, m)["va"][0, 8], head(x2, m)["va"][0, 8])


def test_frame_heads_start_from_a_per_frame_checkpoint():
    cfg = TemporalConfig(window=8, hidden=16, layers=1)
    head = build_head(4, cfg, ("va", "expr")).eval()
    state = {"heads.va.weight": torch.randn(2, 4), "heads.va.bias": torch.randn(2),
             "heads.expr.weight": torch.randn(8, 4), "heads.expr.bias": torch.randn(8)}
    assert load_frame_heads(head, state) == ["va", "expr"]
    x, m = torch.randn(2, 8, 4), torch.ones(2, 8, dtype=torch.bool)
    out = head(x, m)  # context heads start at zero: exactly the per-frame model's outputs
    torch.testing.assert_close(out["va"], torch.tanh(x @ state["heads.va.weight"].T + state["heads.va.bias"]))
    torch.testing.assert_close(out["expr"], x @ state["heads.expr.weight"].T + state["heads.expr.bias"])
