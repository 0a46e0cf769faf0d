"""Output a person reads (issue 25): verify counts, SHARDS not OUT, embed's summary, one backend
line, no amp line on a CPU, log lines through tqdm, config.json's resolved section."""

from __future__ import annotations

import json
import logging

from click.testing import CliRunner

from affpipe.cli import main


def test_verify_prints_per_split_counts_and_names_its_input_shards(shard_dir):
    from affpipe.shards.format import read_manifest

    res = CliRunner().invoke(main, ["verify", str(shard_dir)])
    assert res.exit_code == 0, res.output
    for name, info in read_manifest(shard_dir)["splits"].items():
        assert f"{name}: {info['samples']} samples" in res.output
    for cmd in ("verify", "show"):
        usage = CliRunner().invoke(main, [cmd, "--help"]).output
        assert "SHARDS" in usage and " OUT" not in usage.split("\n")[0]


def test_embed_summary_is_one_readable_line():
    from affpipe.cli.temporal import embed_summary

    line = embed_summary({"rows": 120, "splits": ["train", "val"], "feature_dim": 512, "backbone": "resnet18",
                          "image_size": 112, "loader": {"backend": "torch"}})
    assert line == "120 frames (train, val) → 512-wide features of resnet18 at 112 px" and "{" not in line


def test_backend_said_once_and_logging_goes_through_tqdm(shard_dir, caplog):
    from affpipe.loaders import LoaderConfig
    from affpipe.loaders.factory import make_loader

    with caplog.at_level(logging.INFO, logger="affpipe"):
        for train in (True, False):
            make_loader(shard_dir, "val", batch_size=4, train=train, image_size=32, loader=LoaderConfig(num_workers=0))
    assert sum("loader backend" in r.message for r in caplog.records if r.levelno >= logging.INFO) == 1
    import inspect

    assert "logging_redirect_tqdm" in inspect.getsource(main.callback)


def test_config_json_records_resolved_settings_that_recipes_and_resume_ignore(copy_world, tmp_path):
    from affpipe.run.checkpoint import config_differences
    from affpipe.run.config import RESOLVED_KEY, load_config, to_dict
    from affpipe.run.folder import RunFolder

    files = RunFolder(copy_world / "runs" / "frame")
    saved = files.read_config()
    assert saved["device"] == "cpu" and saved[RESOLVED_KEY]["device"] == "cpu"
    assert saved[RESOLVED_KEY]["amp"] == "none" and saved[RESOLVED_KEY]["loader_backend"] == "torch"
    from affpipe.run.config import from_dict

    assert from_dict(saved).device == "cpu"  # read back as a config: `resolved` is no input
    again = load_config(files.config)  # a run's config.json as a recipe: `resolved` is no input
    assert not config_differences(to_dict(again), {k: v for k, v in saved.items() if k != RESOLVED_KEY})
    assert json.loads(files.config.read_text())[RESOLVED_KEY]["world_size"] == 1


def test_no_amp_line_on_a_cpu_run(copy_world):
    from affpipe.run.folder import RunFolder

    assert RunFolder(copy_world / "runs" / "frame").read_config()["amp"] == "bf16"  # asked, default
