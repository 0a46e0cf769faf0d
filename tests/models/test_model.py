"""Model shapes and ranges per task set; initialization from checkpoints and ImageNet (offline)."""

from __future__ import annotations

import logging
import urllib.error
from pathlib import Path

import pytest
import torch

from affpipe.models.model import ModelConfig, backbone_state_dict, build_model, load_backbone

ALL = ("va", "expr", "au")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("tasks", [("va",), ("expr",), ("au",), ALL, ("expr", "au")])
def test_output_shapes_and_ranges(tasks):
    model = build_model(ModelConfig(tasks=tasks, dropout=0.1)).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 64) * 3)
    assert set(out) == set(tasks)
    sizes = {"va": 2, "expr": 8, "au": 12}
    for t in tasks:
        assert out[t].shape == (3, sizes[t]) and out[t].dtype == torch.float32
    if "va" in out:
        assert out["va"].abs().max() <= 1.0


def test_channels_last_matches_contiguous():
    model = build_model(ModelConfig()).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        got = model_cl(x.contiguous(memory_format=torch.channels_last))
    for t in ALL:
        torch.testing.assert_close(got[t], ref[t], rtol=1e-4, atol=1e-4)


def test_config_validation_and_normalization():
    cfg = ModelConfig(tasks=["va", "au"], init=Path("x.pt"))
    assert cfg.tasks == ("va", "au") and cfg.init == "x.pt"
    hash(cfg)
    assert ModelConfig(arch="resnet50").arch == "resnet50"  # any torchvision classification model
    for bad in (dict(arch="resnet5"), dict(arch="fasterrcnn_resnet50_fpn"), dict(tasks=()), dict(tasks=("va", "va")), dict(tasks=("pose",)), dict(dropout=1.0)):
        with pytest.raises(ValueError):
            ModelConfig(**bad)


@pytest.mark.parametrize("arch,width", [("mobilenet_v3_small", 1024), ("efficientnet_b0", 1280)])
def test_backbone_by_name(arch, width):
    model = build_model(ModelConfig(arch=arch, tasks=("va", "expr")))
    assert model.heads["va"].in_features == width
    out = model.eval()(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert out["va"].shape == (2, 2) and out["expr"].shape == (2, 8)


def _heads_equal(a, b, task):
    return all(torch.equal(x, y) for x, y in zip(a.heads[task].parameters(), b.heads[task].parameters(), strict=True))


def test_init_from_checkpoint_copies_backbone_not_heads(tmp_path):
    src = build_model(ModelConfig(tasks=ALL))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.5)
    ckpt = tmp_path / "last.pt"
    torch.save({"model": src.state_dict(), "epoch": 3, "config": {"lr": 1e-3}}, ckpt)
    dst = build_model(ModelConfig(tasks=ALL, init=str(ckpt)))
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(dst.backbone.state_dict()[k], v), k
    for t in ALL:
        assert not _heads_equal(dst, src, t)


def test_init_from_wrapped_bare_and_torchvision_layouts(tmp_path):
    src = build_model(ModelConfig(tasks=("va",)))
    # DDP/compile prefixes on a bare state_dict
    wrapped = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    torch.save(wrapped, tmp_path / "ddp.pt")
    dst = build_model(ModelConfig(tasks=("expr",)))
    info = load_backbone(dst, tmp_path / "ddp.pt")
    assert not info["missing"] and not info["unexpected"] and "heads.va.weight" in info["ignored"]
    assert torch.equal(dst.backbone.conv1.weight, src.backbone.conv1.weight)
    # torchvision key names (backbone_state_dict, or the ImageNet .pth with its fc)
    sd = backbone_state_dict(src)
    assert "conv1.weight" in sd and not any(k.startswith(("fc.", "backbone.")) for k in sd)
    sd["fc.weight"] = torch.zeros(1000, 512)
    torch.save(sd, tmp_path / "tv.pth")
    dst2 = build_model(ModelConfig(tasks=("au",), init=str(tmp_path / "tv.pth")))
    assert torch.equal(dst2.backbone.layer4[1].conv2.weight, src.backbone.layer4[1].conv2.weight)


def test_init_reports_missing_and_rejects_unrelated(tmp_path, caplog):
    src = build_model(ModelConfig(tasks=("va",)))
    partial = {k: v for k, v in src.state_dict().items() if not k.startswith("backbone.layer4.")}
    partial["backbone.extra.weight"] = torch.zeros(2)
    torch.save({"model": partial}, tmp_path / "partial.pt")
    dst = build_model(ModelConfig(tasks=("va",)))
    with caplog.at_level(logging.WARNING, logger="affpipe.models.model"):
        info = load_backbone(dst, tmp_path / "partial.pt")
    assert any(k.startswith("layer4.") for k in info["missing"]) and info["unexpected"] == ["extra.weight"]
    assert "missing" in caplog.text and "unexpected" in caplog.text
    torch.save({"model": {"encoder.weight": torch.zeros(3)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no backbone weights"):
        build_model(ModelConfig(init=str(tmp_path / "other.pt")))
    with pytest.raises(FileNotFoundError):
        build_model(ModelConfig(init=str(tmp_path / "absent.pt")))
    bad = dict(src.state_dict())
    bad["backbone.conv1.weight"] = torch.zeros(64, 1, 7, 7)
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="shape mismatch"):
        build_model(ModelConfig(init=str(tmp_path / "shape.pt")))


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # restored after the test
    torch.hub.set_dir(str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_imagenet_offline_error_names_cache_file(empty_hub, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as err:
        build_model(ModelConfig(init="imagenet"))
    msg = str(err.value)
    assert str(empty_hub / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "--init PATH" in msg


def test_imagenet_uses_cached_file(empty_hub, monkeypatch):
    from torchvision.models import resnet18

    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    ref = resnet18(weights=None)
    (empty_hub / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), empty_hub / "checkpoints" / "resnet18-f37072fd.pth")
    model = build_model(ModelConfig(tasks=("expr",), init="imagenet"))
    assert torch.equal(model.backbone.layer2[0].conv1.weight, ref.layer2[0].conv1.weight)
