"""timm backbones, weight files (--weights) and each backbone's own input op."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from affpipe.models.model import InputNorm, ModelConfig, build_model, load_backbone, resolve_input
from affpipe.run.checkpoint import read_metrics
from affpipe.run.config import from_dict, load_config

TIMM = "timm/mobilenetv3_small_050"  # 0.57M parameters: a tiny timm model
TINY = {"image_size": 32, "batch_size": 16, "max_steps_per_epoch": 2, "max_val_steps": 3, "loader.num_workers": 0,
        "loader.backend": "torch", "device": "cpu", "log_every": 1, "epochs": 1}
FLAGS = ["--image-size", "32", "--batch-size", "16", "--max-steps-per-epoch", "2", "--max-val-steps", "3",
         "--num-workers", "0", "--backend", "torch", "--device", "cpu", "--log-every", "1", "--epochs", "1"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "affpipe.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


# ---- timm by name --------------------------------------------------------------------------


def test_timm_names_are_checked_and_kept_apart_from_torchvision():
    assert ModelConfig(arch=TIMM).arch == TIMM
    with pytest.raises(ValueError, match="timm has no model"):
        ModelConfig(arch="timm/resnet_does_not_exist")
    with pytest.raises(ValueError, match="timm/NAME"):
        ModelConfig(arch="mobilenetv3_small_050")  # timm's spelling without the prefix: not torchvision's


def test_timm_backbone_features_are_timms_pooled_width():
    import timm

    model = build_model(ModelConfig(arch=TIMM, tasks=("va", "au"))).eval()
    ref = timm.create_model("mobilenetv3_small_050", num_classes=0)
    width = ref.head_hidden_size
    assert model.heads["va"].in_features == width == 1024
    out = model(torch.zeros(2, 3, 48, 48, dtype=torch.uint8))
    assert out["va"].shape == (2, 2) and out["au"].shape == (2, 12)
    assert model.features(torch.zeros(2, 3, 48, 48, dtype=torch.uint8)).shape == (2, width)


def test_timm_train_embed_evaluate(shard_dir, tmp_path):
    """A tiny timm model trains a few steps, embeds, and evaluates (random init)."""
    from affpipe.loaders import LoaderConfig
    from affpipe.runs.embed import EmbedConfig, embed
    from affpipe.runs.evaluate import EvalConfig, evaluate
    from affpipe.runs.train import train
    from affpipe.temporal.features import read_table

    run = train(load_config(None, {"task": "mtl", "shards": shard_dir, "out": tmp_path / "run",
                                   "model.arch": TIMM, **TINY}))
    cfg = from_dict(json.loads((run / "config.json").read_text()))
    # config.json records the input the backbone was given (timm's pretrained config: ImageNet stats, bicubic)
    assert cfg.model.arch == TIMM and cfg.model.input_size == 32 and cfg.model.interpolation == "bicubic"
    assert cfg.model.mean == pytest.approx((0.485, 0.456, 0.406))
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == [1, 2]
    result = evaluate(EvalConfig(run=run, shards=shard_dir, split="val", device="cpu",
                                 loader=LoaderConfig(backend="torch", num_workers=0)))
    assert {"va_ccc", "expr_f1", "au_f1"} <= set(result)
    m = embed(EmbedConfig(source=str(run), shards=shard_dir, out=tmp_path / "feats", split="val", batch_size=32,
                          device="cpu", loader=LoaderConfig(backend="torch", num_workers=0)))
    assert m["backbone"] == TIMM and m["feature_dim"] == 1024 and m["input"]["interpolation"] == "bicubic"
    assert read_table(tmp_path / "feats").dim == 1024


def test_timm_pretrained_offline_is_one_line_naming_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(RuntimeError) as err:
        build_model(ModelConfig(arch=TIMM, init="imagenet"))
    msg = str(err.value)
    assert "\n" not in msg and "not in the local cache" in msg
    assert "timm.create_model('mobilenetv3_small_050', pretrained=True)" in msg and "--weights FILE" in msg


def test_timm_pretrained_from_the_cache_loads_without_network(tmp_path, monkeypatch):
    """A file in torch hub's cache under the name of timm's URL is found and loaded, no download."""
    import timm
    from timm.models import get_pretrained_cfg

    import affpipe.models.backbones as bb

    monkeypatch.setattr(bb, "_timm_cfg", lambda arch: get_pretrained_cfg("resnet10t").__class__(
        **{**get_pretrained_cfg("resnet10t").__dict__, "hf_hub_id": None}))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    src = timm.create_model("resnet10t")
    cached = tmp_path / "hub" / "checkpoints" / "resnet10t_176_c3-f3215ab1.pth"
    cached.parent.mkdir(parents=True)
    torch.save(src.state_dict(), cached)
    model = build_model(ModelConfig(arch="timm/resnet10t", init="imagenet"))
    assert torch.equal(model.backbone.conv1[0].weight, src.conv1[0].weight)
    assert model.init_report["file"] == str(cached)


# ---- the backbone's own input ----------------------------------------------------------------


def test_input_resolution_from_the_backbone_and_recipe_overrides():
    tv = resolve_input(ModelConfig(), 112)
    assert (tv.input_size, tv.interpolation) == (112, "bilinear") and tv.std == pytest.approx((0.229, 0.224, 0.225))
    vit = resolve_input(ModelConfig(arch="timm/vit_tiny_patch16_224"), 112)
    assert (vit.input_size, vit.interpolation, vit.mean) == (224, "bicubic", (0.5, 0.5, 0.5))  # fixed size: its own
    own = resolve_input(ModelConfig(arch="timm/vit_tiny_patch16_224", input_size=32, mean=(0.1, 0.2, 0.3),
                                    interpolation="bilinear"), 112)
    assert (own.input_size, own.mean, own.interpolation, own.std) == (32, (0.1, 0.2, 0.3), "bilinear", (0.5, 0.5, 0.5))
    for bad in (dict(mean=(0.5, 0.5)), dict(std=(0.2, 0.0, 0.2)), dict(interpolation="lanczos"), dict(input_size=4)):
        with pytest.raises(ValueError):
            ModelConfig(**bad)


def test_input_norm_resizes_and_normalizes_with_the_backbones_statistics():
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    norm = InputNorm(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")
    out = norm(x)
    ref = (torch.nn.functional.interpolate(x.float(), size=(32, 32), mode="bilinear", align_corners=False) / 255 - 0.5) / 0.25
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    cl = norm(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-5, atol=1e-5)
    # ImageNet statistics at the arriving size: the loaders' own arithmetic
    from affpipe.batch import normalize_uint8

    imagenet = InputNorm(None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.testing.assert_close(imagenet(x), normalize_uint8(x))
    bicubic = InputNorm(64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bicubic")(torch.full((1, 3, 8, 8), 255, dtype=torch.uint8))
    assert bicubic.max() <= 1.0 + 1e-6  # overshoot clamped to the pixel range


def test_vit_trains_at_twice_the_frame_size(shard_dir, tmp_path):
    """A ViT-style backbone with a fixed input twice the loader's size trains from the frames
    (resized on the device by the model's first op) — 224 from 112 at full scale, 64 from 32 here."""
    from affpipe.runs.train import train

    run = train(load_config(None, {"task": "va", "shards": shard_dir, "out": tmp_path / "vit", **TINY,
                                   "model.arch": "timm/vit_tiny_patch16_224", "model.input_size": 64}))
    cfg = json.loads((run / "config.json").read_text())["model"]
    assert (cfg["input_size"], cfg["interpolation"], cfg["mean"]) == (64, "bicubic", [0.5, 0.5, 0.5])
    assert json.loads((run / "config.json").read_text())["image_size"] == 32
    model = build_model(from_dict(json.loads((run / "config.json").read_text())).model)
    assert model.backbone.patch_embed.img_size == (64, 64)
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert seen == [(2, 3, 64, 64)]
    assert (run / "best.pt").is_file()


# ---- weight files ----------------------------------------------------------------------------


def _timm_state():
    torch.manual_seed(1)
    return build_model(ModelConfig(arch=TIMM, tasks=("va",))).backbone.state_dict()


def test_weights_safetensors_and_wrapped_state_dict_report_the_key_summary(shard_dir, tmp_path):
    from safetensors.torch import save_file

    state = _timm_state()
    st = tmp_path / "face.safetensors"
    extra = {"classifier.weight": torch.zeros(8, 1024), "classifier.bias": torch.zeros(8)}
    save_file({**{f"model.{k}": v.contiguous() for k, v in state.items()}, **extra}, str(st))
    pt = tmp_path / "face.pt"
    torch.save({"state_dict": {f"module.backbone.{k}": v for k, v in state.items() if not k.startswith("blocks.5.")},
                "epoch": 12, "extra.proj": torch.zeros(3)}, pt)  # a training script's checkpoint
    for path, missing in ((st, 0), (pt, sum(1 for k in state if k.startswith("blocks.5.") and "num_batches" not in k))):
        run = tmp_path / f"run-{path.suffix[1:]}"
        res = _cli("train", "--task", "au", "--shards", str(shard_dir), "-o", str(run),
                   "--backbone", TIMM, "--weights", str(path), *FLAGS, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        init = next(r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "init")
        assert init["file"] == str(path.resolve()) and len(init["sha256"]) == 64
        assert init["missing"] == missing and init["unexpected"] == 0
        assert init["loaded"] == len(state) - missing - (missing > 0) * sum(
            1 for k in state if k.startswith("blocks.5.") and "num_batches" in k)
        assert "tensors matched" in res.stderr
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["model"]["init"] == str(path)
    assert init["missing_keys"][0].startswith("blocks.5.")
    ign = next(r for r in read_metrics(tmp_path / "run-safetensors" / "metrics.jsonl") if r["kind"] == "init")
    assert ign["ignored"] == 2  # the classifier's keys were dropped, not loaded


def test_weights_loaded_values_equal_the_file(tmp_path):
    from safetensors.torch import save_file

    state = _timm_state()
    save_file({f"encoder.{k}": v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    model = build_model(ModelConfig(arch=TIMM, tasks=("va",), init=str(tmp_path / "w.safetensors")))
    for k, v in state.items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    assert model.init_report["missing"] == [] and model.init_report["unexpected"] == []


def test_weights_of_another_architecture_or_shape_are_refused(tmp_path):
    from safetensors.torch import save_file

    resnet = build_model(ModelConfig(tasks=("va",))).backbone.state_dict()
    save_file({k: v.contiguous() for k, v in resnet.items()}, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(ValueError, match="another architecture"):
        build_model(ModelConfig(arch=TIMM, tasks=("va",), init=str(tmp_path / "resnet.safetensors")))
    save_file({"text_encoder.token_embedding": torch.zeros(3)}, str(tmp_path / "clip.safetensors"))
    with pytest.raises(ValueError, match="no backbone weights found"):
        build_model(ModelConfig(arch=TIMM, tasks=("va",), init=str(tmp_path / "clip.safetensors")))
    state = _timm_state()
    few = dict(list(state.items())[:5])
    save_file({k: v.contiguous() for k, v in few.items()}, str(tmp_path / "few.safetensors"))
    with pytest.raises(ValueError, match="only 5 of the backbone's"):
        build_model(ModelConfig(arch=TIMM, tasks=("va",), init=str(tmp_path / "few.safetensors")))
    key = next(k for k, v in state.items() if v.dim() == 4)
    bad = {**state, key: torch.zeros(1, 1, 1, 1)}
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="shape mismatch"):
        build_model(ModelConfig(arch=TIMM, tasks=("va",), init=str(tmp_path / "shape.pt")))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        build_model(ModelConfig(arch=TIMM, tasks=("va",), init=str(tmp_path / "junk.safetensors")))


class _Payload:
    """Unpickling this would create a marker file: proof of executed code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_whole_model_is_refused_with_the_conversion_command_and_never_runs(shard_dir, tmp_path):
    marker = tmp_path / "EXECUTED"
    whole = tmp_path / "enet_b0_8_best_afew.pt"
    torch.save({"model": _Payload(str(marker)), "w": torch.zeros(2)}, whole)
    net = tmp_path / "net.pt"
    torch.save(torch.nn.Linear(2, 2), net)  # torch.save(model): the HSEmotion way
    assert not marker.exists()
    for path in (whole, net):
        with pytest.raises(ValueError) as err:
            build_model(ModelConfig(arch=TIMM, init=str(path)))
        msg = str(err.value)
        assert "refused" in msg and "weights_only=False" in msg and "save_file" in msg
        assert f"{path.with_suffix('.safetensors')}" in msg and "\n" not in msg
    assert "torch.nn.modules.linear.Linear" in msg
    res = _cli("train", "--task", "va", "--shards", str(shard_dir), "-o", str(tmp_path / "r"), "--backbone", TIMM,
               "--weights", str(whole), *FLAGS, cwd=tmp_path)
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith("Error:")
    assert "Traceback" not in res.stderr
    assert "python -c" in res.stderr
    assert not marker.exists()  # nothing in the file ran


def test_conversion_command_works_on_a_trusted_file(tmp_path):
    """The command the refusal prints turns a pickled model into a safetensors file that loads."""
    import shlex

    from affpipe.models.weights import conversion_command, read_weights

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    cmd = shlex.split(conversion_command(path))
    assert cmd[:2] == [sys.executable, "-c"]  # the interpreter affpipe runs under, not a bare `python`
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=120)
    got = read_weights(path.with_suffix(".safetensors"))
    assert set(got) == set(net.state_dict()) and torch.equal(got["0.weight"], net[0].weight)


def test_load_backbone_keeps_its_summary_keys(tmp_path):
    src = build_model(ModelConfig(tasks=("va",)))
    torch.save({"model": src.state_dict()}, tmp_path / "ckpt.pt")
    dst = build_model(ModelConfig(tasks=("au",)))
    info = load_backbone(dst, tmp_path / "ckpt.pt")
    assert set(info) >= {"loaded", "missing", "unexpected", "ignored", "file", "sha256"}
    assert "heads.va.weight" in info["ignored"] and not info["missing"]


def test_cli_embed_with_a_weight_file_and_flag_conflicts(shard_dir, tmp_path):
    from safetensors.torch import save_file

    from affpipe.temporal.features import read_table

    state = _timm_state()
    w = tmp_path / "face.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in state.items()}, str(w))
    res = _cli("embed", "--weights", str(w), "--backbone", TIMM, "--shards", str(shard_dir), "-o", str(tmp_path / "f"),
               "--split", "val", "--image-size", "32", "--batch-size", "64", "--backend", "torch", "--device", "cpu",
               "--num-workers", "0", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert m["backbone"] == TIMM and m["feature_dim"] == 1024
    assert (tmp_path / "f" / m["source_checkpoint"]).resolve() == w.resolve() and m["source"] == str(w)
    assert read_table(tmp_path / "f").dim == 1024
    both = _cli("embed", "imagenet", "--weights", str(w), "--shards", str(shard_dir), "-o", str(tmp_path / "g"),
                cwd=tmp_path)
    assert both.returncode != 0 and "one of the two" in both.stderr
    clash = _cli("train", "--task", "va", "--shards", str(shard_dir), "-o", str(tmp_path / "r"), "--init", "imagenet",
                 "--weights", str(w), cwd=tmp_path)
    assert clash.returncode != 0 and "not both" in clash.stderr
