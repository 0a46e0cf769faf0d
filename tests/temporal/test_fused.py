"""Fused features: tables of the same index joined row for row; others refused naming both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from temporal_support import toy_table

from affpipe.temporal.features import read_table
from affpipe.temporal.fused import FusedMatrix, fuse_tables


def _stamp(folder, **keys):
    m = json.loads((folder / "manifest.json").read_text())
    m.update(keys)
    (folder / "manifest.json").write_text(json.dumps(m))
    return read_table(folder)


def test_fused_matrix_gathers_and_concatenates_without_a_copy():
    a = np.arange(12, dtype=np.float16).reshape(4, 3)
    b = -np.arange(8, dtype=np.float16).reshape(4, 2)
    f = FusedMatrix([a, b])
    assert f.shape == (4, 5) and f.dtype == np.float16 and len(f) == 4
    np.testing.assert_array_equal(f[np.array([3, 0])], np.concatenate([a[[3, 0]], b[[3, 0]]], 1))
    np.testing.assert_array_equal(np.asarray(f), np.concatenate([a, b], 1))
    with pytest.raises(ValueError, match="same rows"):
        FusedMatrix([a, b[:3]])


def test_fuse_tables_of_one_index(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    toy_table(tmp_path / "a", dim=8)
    toy_table(tmp_path / "b", dim=4)
    a = _stamp(tmp_path / "a", index_fingerprint="f00d", backbone="resnet18")
    b = _stamp(tmp_path / "b", index_fingerprint="f00d", backbone="timm/x")
    fused = fuse_tables([a, b])
    assert fused.dim == 12 and len(fused) == len(a)
    np.testing.assert_array_equal(fused.features[np.arange(5)], np.concatenate([a.features[:5], b.features[:5]], 1))
    assert [p["backbone"] for p in fused.manifest["fused"]] == ["resnet18", "timm/x"]
    assert fused.manifest["feature_dim"] == 12 and fused.manifest.get("source_checkpoint") is None


def test_fuse_refuses_another_index_or_other_rows(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    toy_table(tmp_path / "a", dim=4)
    a = _stamp(tmp_path / "a", index_fingerprint="f00d")
    toy_table(tmp_path / "b", dim=4)
    b = _stamp(tmp_path / "b", index_fingerprint="beef")
    with pytest.raises(ValueError) as err:
        fuse_tables([a, b])
    assert str(tmp_path / "a") in str(err.value) and str(tmp_path / "b") in str(err.value)
    assert "f00d" in str(err.value) and "beef" in str(err.value)
    toy_table(tmp_path / "c", n=15, dim=4)  # fewer frames per video: other rows
    c = _stamp(tmp_path / "c", index_fingerprint="f00d")
    with pytest.raises(ValueError, match="hold different frames"):
        fuse_tables([a, c])


# ---- end to end: one pass over the frames for two backbones, then a temporal run on both ----


TIMM = "timm/mobilenetv3_small_050"


@pytest.fixture(scope="module")
def two_tables(shard_dir, tmp_path_factory):
    """`embed --backbone resnet18 --backbone timm/...` (random weights through weight files),
    counting the JPEG decodes."""
    import cv2
    from safetensors.torch import save_file

    from affpipe.loaders import LoaderConfig
    from affpipe.models.model import ModelConfig, backbone_state_dict, build_model
    from affpipe.runs.embed import EmbedConfig, embed

    root = tmp_path_factory.mktemp("fused")
    weights = []
    for arch in ("resnet18", TIMM):
        w = root / f"{arch.replace('/', '_')}.safetensors"
        save_file({k: v.contiguous() for k, v in backbone_state_dict(build_model(ModelConfig(arch=arch))).items()}, str(w))
        weights.append(w)
    calls = {"n": 0}
    real = cv2.imdecode

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    cv2.imdecode = counting
    try:
        result = embed(EmbedConfig(source="weights", weights=tuple(weights), backbone=("resnet18", TIMM), shards=shard_dir,
                                   out=root / "feats", image_size=32, batch_size=64, device="cpu",
                                   loader=LoaderConfig(backend="torch", num_workers=0)))
    finally:
        cv2.imdecode = real
    return root, result, calls["n"], weights


def test_embed_two_backbones_decodes_each_frame_once(two_tables, shard_dir):
    root, result, decodes, _ = two_tables
    shards = json.loads((shard_dir / "manifest.json").read_text())
    frames = sum(s["samples"] for s in shards["splits"].values())
    assert decodes == frames  # one decode per frame for both backbones
    a, b = result["tables"]
    assert (a["backbone"], a["feature_dim"], b["backbone"], b["feature_dim"]) == ("resnet18", 512, TIMM, 1024)
    assert read_table(root / "feats" / "resnet18").dim == 512 and read_table(root / "feats" / "timm_mobilenetv3_small_050").dim == 1024
    assert a["rows"] == b["rows"] == frames and a["index_fingerprint"] == b["index_fingerprint"]


def test_embed_two_backbones_equals_each_alone(two_tables, shard_dir, tmp_path):
    from affpipe.loaders import LoaderConfig
    from affpipe.runs.embed import EmbedConfig, embed

    root, _, _, weights = two_tables
    embed(EmbedConfig(source="weights", weights=weights[1], backbone=TIMM, shards=shard_dir, out=tmp_path / "alone",
                      image_size=32, batch_size=64, device="cpu", loader=LoaderConfig(backend="torch", num_workers=0)))
    alone, joint = read_table(tmp_path / "alone"), read_table(root / "feats" / "timm_mobilenetv3_small_050")
    np.testing.assert_array_equal(alone.row_id, joint.row_id)
    np.testing.assert_array_equal(alone.features, joint.features)


def test_train_on_two_fused_tables_then_evaluate(two_tables, tmp_path):
    import os
    import subprocess
    import sys

    from affpipe.run.checkpoint import load_checkpoint
    from affpipe.runs.evaluate import EvalConfig, evaluate

    root, _, _, _ = two_tables
    a, b = root / "feats" / "resnet18", root / "feats" / "timm_mobilenetv3_small_050"
    run = tmp_path / "fused"
    res = subprocess.run([sys.executable, "-m", "affpipe.cli", "train", "--task", "mtl", "--features", str(a),
                          "--features", str(b), "-o", str(run), "--epochs", "1", "--batch-size", "4", "--window", "8",
                          "--stride", "8", "--device", "cpu", "--max-steps-per-epoch", "3", "--log-every", "1"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["features"] == [str(a), str(b)]
    lin = json.loads((run / "lineage.json").read_text())
    assert len(lin["features"]) == 2 and len(lin["features_fingerprint"]) == 2
    state = load_checkpoint(run / "best.pt")
    # the model reads 512 + 1024 features per frame
    assert any(v.dim() >= 2 and v.shape[1] == 512 + 1024 for v in state["model"].values())
    result = evaluate(EvalConfig(run=run, device="cpu"))
    assert {"va_ccc", "expr_f1", "au_f1"} <= set(result)
    # the same tables in the other order are other features: refused naming the table
    with pytest.raises(ValueError, match="feature table #1"):
        evaluate(EvalConfig(run=run, features=(b, a), device="cpu", write=False))


def test_recipe_temporal_features_list(tmp_path):
    from affpipe.run.config import load_config

    recipe = tmp_path / "r.toml"
    recipe.write_text('task = "mtl"\nmodel = "temporal"\n[temporal]\narch = "tcn"\nfeatures = ["feats/a", "feats/b"]\n')
    cfg = load_config(recipe, {})
    assert [str(p) for p in cfg.data.features] == ["feats/a", "feats/b"] and cfg.data.temporal.arch == "tcn"
    one = tmp_path / "one.toml"
    one.write_text('task = "mtl"\nfeatures = "feats/a"\n')
    assert load_config(one, {}).data.features == (load_config(one, {}).data.features[0],)
    both = tmp_path / "both.toml"
    both.write_text('task = "mtl"\nfeatures = "feats/a"\n[temporal]\nfeatures = ["feats/b"]\n')
    with pytest.raises(ValueError, match="given twice"):
        load_config(both, {})


def test_pipelines_fused_recipe_loads():

    from affpipe.run.config import from_dict, load_config, to_dict

    cfg = load_config(Path(__file__).resolve().parents[2] / "pipelines" / "mtl_fused_tcn.toml", {"out": "x"})
    assert (cfg.kind == "temporal") and [p.name for p in cfg.data.features] == ["uni_au", "mtl"] and cfg.logging.tensorboard
    assert from_dict(to_dict(cfg)) == cfg
