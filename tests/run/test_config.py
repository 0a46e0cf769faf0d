"""TrainConfig: recipe TOML → overrides → JSON round trip, and clear errors for bad recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from affpipe.run.checkpoint import config_differences
from affpipe.run.config import TrainConfig, from_dict, load_config, to_dict

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_recipe_overrides_round_trip(tmp_path):
    recipe = _recipe(tmp_path, 'task = "va"\nepochs = 7\nlr = 1\n[model]\ninit = "random"\n[loss]\nva_loss = "mse"\n')
    cfg = load_config(recipe, {"epochs": 2, "batch_size": None, "model.dropout": 0.25, "shards": "s", "out": tmp_path / "run"})
    assert cfg.task == "va" and cfg.epochs == 2 and cfg.batch_size == TrainConfig.batch_size
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # TOML int widened to float
    assert cfg.model.dropout == 0.25 and cfg.model.tasks == ("va",) and cfg.loss.va_loss == "mse"
    assert cfg.data.shards == Path("s")
    again = from_dict(json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg
    assert load_config(_write_json(tmp_path, cfg)) == cfg  # a run's config.json is a recipe too


def _write_json(tmp_path: Path, cfg: TrainConfig) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(to_dict(cfg)))
    return path


def test_mtl_task_weights_tuple(tmp_path):
    cfg = load_config(_recipe(tmp_path, 'task = "mtl"\n[loss]\ntask_weights = [1, 0.5, 2]\n'), {})
    assert cfg.loss.task_weights == (1.0, 0.5, 2.0)
    assert cfg.model.tasks == ("va", "expr", "au")
    assert from_dict(to_dict(cfg)) == cfg


def test_unknown_key_names_key_file_and_line(tmp_path):
    recipe = _recipe(tmp_path, 'task = "au"\n\n[loss]\nau_pos_wieght = true\n')
    with pytest.raises(ValueError, match=r"r\.toml:4: unknown key 'loss\.au_pos_wieght'"):
        load_config(recipe, {})
    with pytest.raises(ValueError, match="unknown key 'bogus'"):
        load_config(None, {"bogus": 1})


def test_bad_values(tmp_path):
    with pytest.raises(ValueError, match=r"r\.toml:1: epochs must be an integer"):
        load_config(_recipe(tmp_path, 'epochs = "ten"\n'), {})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        load_config(None, {"optimizer": "lamb"})
    with pytest.raises(ValueError, match="va_loss"):
        load_config(None, {"loss.va_loss": "l1"})
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(_recipe(tmp_path, "task = \n"), {})


@pytest.mark.parametrize("name", ["uni_va", "uni_expr", "uni_au", "mtl", "mtl_from_uni", "demo", "mtl_timm",
                                  "mtl_face_weights"])
def test_pipelines_load(name):
    cfg = load_config(PIPELINES / f"{name}.toml", {"shards": "x", "out": "y", "image_size": 64})
    task = {"uni_va": "va", "uni_expr": "expr", "uni_au": "au"}.get(name, "mtl")
    assert cfg.task == task and cfg.image_size == 64
    if name in ("uni_va", "uni_expr", "uni_au", "mtl", "mtl_from_uni"):
        assert cfg.batch_size == 256
    assert from_dict(to_dict(cfg)) == cfg


def test_config_differences_ignores_resume_and_epochs(tmp_path):
    a = load_config(None, {"task": "va", "out": "runs/a", "shards": "s"})
    b = load_config(None, {"task": "va", "out": "runs/a", "shards": "s", "epochs": 99, "resume": True})
    assert config_differences(to_dict(a), to_dict(b)) == []
    c = load_config(None, {"task": "va", "out": "runs/a", "shards": "s", "lr": 0.5, "loss.va_loss": "mse"})
    diffs = config_differences(to_dict(a), to_dict(c))
    assert len(diffs) == 2 and diffs[0].startswith("loss.va_loss") and diffs[1].startswith("lr")


def test_an_old_config_with_top_level_loader_keys_still_loads():
    """Checkpoints of affpipe 0.1 kept backend/num_workers/flip_p/max_rotation at the top level."""
    old = to_dict(TrainConfig.of(task="va"))
    loader = old.pop("loader")
    loader.pop("on_bad")  # 0.1 had no on_bad
    old.update(loader)
    cfg = from_dict(old)
    assert cfg.loader == TrainConfig.of(task="va").loader and cfg.task == "va"


def test_loader_section_and_bad_values():
    cfg = load_config(None, {"task": "au", "loader.backend": "torch", "loader.on_bad": "skip"})
    assert cfg.loader.backend == "torch" and cfg.loader.on_bad == "skip"
    for key, value in (("loader.backend", "cuda"), ("loader.num_workers", -1), ("loader.flip_p", 2.0),
                       ("lr", 0.0), ("lr", -1e-3), ("plateau_factor", 1.0), ("weight_decay", -1.0),
                       ("device", "tpu")):
        with pytest.raises(ValueError, match=key.split(".")[-1]):
            load_config(None, {"task": "au", key: value})
