"""Pre-training methods: losses learn, collapse is detected, backbones load where training reads them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from affpipe.pretrain import (
    MAE,
    SimSiam,
    collapse_stats,
    default_recipe,
    load_recipe,
    lr_at,
    make_method,
    make_optimizer,
    set_lr,
)

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
VIT = "timm/test_vit"  # timm's tiny ViT for tests: 64 wide, 6 blocks, 16 px patches


def _views(n: int = 8, k: int = 2, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g) for _ in range(k)]


def _tiny_mae(**kw) -> MAE:
    return MAE(VIT, decoder_dim=32, decoder_depth=1, decoder_heads=2, image_size=64, **kw)


def _steps(method, views, opt, n: int, **kw) -> list[float]:
    losses = []
    for _ in range(n):
        out = method.loss(views, **kw)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    return losses


def test_simsiam_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    m = SimSiam("timm/test_resnet", proj_dim=64, pred_dim=16, image_size=32)  # a tiny CNN: seconds on a CPU
    views = _views()
    out = m.loss(views)
    assert set(out) == {"loss", "cos", "z_std"} and -1.0 <= float(out["loss"].detach()) <= 1.0
    losses = _steps(m, views, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), 5)
    assert losses[-1] < losses[0] - 0.05


def test_mae_loss_decreases_on_a_fixed_batch_and_masks_three_quarters():
    torch.manual_seed(0)
    m = _tiny_mae()
    views = _views(k=1, size=64)
    _, mask, _ = m.encode(views[0].float(),
                          torch.Generator().manual_seed(0))
    assert mask.shape == (8, 16) and (mask.sum(1) == 12).all()  # 4x4 patches of 16 px, 75% masked
    opt = torch.optim.AdamW(m.param_groups(0.05), lr=3e-3, betas=(0.9, 0.95))
    losses = _steps(m, views, opt, 5, generator=torch.Generator().manual_seed(1))
    assert losses[-1] < losses[0] * 0.9


def test_mae_refuses_a_cnn_in_one_line():
    with pytest.raises(ValueError, match=r"method 'mae' needs a ViT backbone.*'resnet18'.*simsiam") as info:
        MAE("resnet18", image_size=64)
    assert "\n" not in str(info.value)


def test_simsiam_needs_two_views():
    with pytest.raises(ValueError, match="exactly 2 views"):
        SimSiam("resnet18", proj_dim=32, pred_dim=8, image_size=64).loss(_views(k=3))


def test_nan_in_a_view_is_a_clear_error():
    m = SimSiam("resnet18", proj_dim=32, pred_dim=8, image_size=64)
    views = [v.float() for v in _views()]
    views[1][3, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"view 1: 1 image\(s\) hold NaN .*sample 3"):
        m.loss(views)
    with pytest.raises(ValueError, match="view 0"):
        _tiny_mae().loss([torch.nn.functional.interpolate(views[1], size=64)])  # the same check on every method's input


def test_collapse_statistic_flags_constant_and_one_dimensional_features():
    torch.manual_seed(0)
    assert collapse_stats(torch.ones(16, 32) * 3)["collapsed"]
    line = torch.randn(16, 1) * torch.ones(1, 32) + 5
    assert collapse_stats(line)["collapsed"] and collapse_stats(line)["rank"] < 1.5
    healthy = collapse_stats(torch.randn(16, 32))
    assert not healthy["collapsed"] and 0.7 < healthy["std_ratio"] < 1.2 and healthy["rank"] > 8
    m = SimSiam("resnet18", proj_dim=32, pred_dim=8, image_size=64)
    stats = m.collapse(_views(n=8, size=64))
    assert not stats["collapsed"] and m.training  # measured in eval mode, mode restored


@pytest.mark.parametrize("arch", ["resnet18", VIT])
def test_backbone_state_dict_loads_into_the_per_frame_backbone(arch, tmp_path):
    from safetensors.torch import save_file

    from affpipe.models.backbones import make_backbone
    from affpipe.models.weights import load_into

    method = _tiny_mae() if arch == VIT else SimSiam(arch, proj_dim=32, pred_dim=8, image_size=64)
    state = method.backbone_state_dict()
    assert not any(k.startswith(("fc.", "head.", "projector", "predictor", "decoder")) for k in state)
    path = tmp_path / "pretrained.safetensors"
    save_file(state, str(path))
    backbone, _, classifier = make_backbone(arch, input_size=64)
    summary = load_into(backbone, path, classifier)
    own = [k for k in backbone.state_dict() if not k.endswith("num_batches_tracked")]
    assert not summary["missing"] and not summary["unexpected"] and len(summary["loaded"]) >= len(own)
    assert all(torch.equal(backbone.state_dict()[k], state[k]) for k in own)


def test_recipes_load_with_published_defaults_and_schedule():
    mae, sim = load_recipe(PIPELINES / "pretrain_mae.toml"), load_recipe(PIPELINES / "pretrain_simsiam.toml")
    assert mae == default_recipe("mae") and sim == default_recipe("simsiam")
    assert (mae.mae.mask_ratio, mae.optim.blr, mae.optim.weight_decay, mae.optim.betas) == (0.75, 1.5e-4, 0.05, (0.9, 0.95))
    assert mae.optim.lr(4096) == pytest.approx(2.4e-3) and len(mae.views) == 1 and mae.views[0].jitter_p == 0
    assert sim.arch == "resnet18" and sim.optim.optimizer == "sgd" and len(sim.views) == 2
    assert lr_at(mae, 0) == 0 and lr_at(mae, 40) == pytest.approx(2.4e-3) and lr_at(mae, 800) == pytest.approx(0)
    assert lr_at(mae, 20) == pytest.approx(1.2e-3) and lr_at(mae, 420) == pytest.approx(1.2e-3)
    small = dataclasses.replace(sim, batch_size=4, simsiam=dataclasses.replace(sim.simsiam, proj_dim=32, pred_dim=8),
                                image_size=112)
    method = make_method(small)
    opt = make_optimizer(method, small)
    set_lr(opt, 0.123)
    assert [g["lr"] for g in opt.param_groups] == [0.123, small.optim.lr(4)]  # SimSiam's predictor: fixed lr


def test_recipe_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text('method = "mae"\n[mae]\nmask = 0.5\n')
    with pytest.raises(ValueError, match=r"r\.toml \[mae\]: unknown key\(s\) \['mask'\]"):
        load_recipe(bad)
    bad.write_text('method = "simsiam"\n[data]\nsplits = ["val"]\n')
    with pytest.raises(ValueError, match="allow_val"):
        load_recipe(bad)
    bad.write_text('method = "byol"\n')
    with pytest.raises(ValueError, match="method must be one of"):
        load_recipe(bad)
