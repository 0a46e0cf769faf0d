import pytest

from affpipe.run.config import TemporalConfig, from_dict, load_config, to_dict


def test_temporal_recipe_needs_features_and_round_trips(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "temporal"\ntask = "mtl"\n[temporal]\narch = "transformer"\nwindow = 16\n')
    with pytest.raises(ValueError, match="needs a feature table"):
        load_config(recipe)
    cfg = load_config(recipe, {"features": str(tmp_path / "f"), "out": str(tmp_path / "run")})
    assert (cfg.kind == "temporal") and cfg.data.temporal.arch == "transformer" and cfg.data.temporal.window == 16
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("bad", [dict(arch="lstm"), dict(window=0), dict(kernel=4), dict(eval_stride=99),
                                 dict(arch="transformer", hidden=30, attention_heads=4), dict(dropout=1.0)])
def test_temporal_config_validation(bad):
    with pytest.raises(ValueError):
        TemporalConfig(**bad)


@pytest.mark.parametrize("flag, key, value", [("--window", "temporal.window", 16), ("--stride", "temporal.stride", 4),
                                              ("--temporal-arch", "temporal.arch", "transformer")])
def test_temporal_flags_without_features_are_refused_naming_the_flag(tmp_path, flag, key, value):
    with pytest.raises(ValueError, match=f"^{flag}: .*--features"):
        load_config(None, {"task": "va", "shards": str(tmp_path), key: value})


def test_temporal_options_in_a_recipe_without_features_name_the_line(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('task = "va"\n[temporal]\nwindow = 16\n')
    with pytest.raises(ValueError, match=r"r\.toml:3: temporal\.window: .*--features"):
        load_config(recipe, {"shards": str(tmp_path)})


def test_shards_with_features_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match="^--shards: .*feature table"):
        load_config(None, {"task": "va", "shards": str(tmp_path), "features": str(tmp_path)})
    cfg = load_config(None, {"task": "va", "features": str(tmp_path), "temporal.window": 8})
    assert (cfg.kind == "temporal") and not hasattr(cfg.data, "shards")
