"""Shards record the index they were written from (and their own fingerprint); a per-frame run
records what it trained on (``lineage.json``, ``state["lineage"]``); an index passed with
``--index`` (or found elsewhere) is checked against the shards: one line naming both."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from support import make_index

from affpipe.cli import main
from affpipe.index.build import index_fingerprint
from affpipe.run.checkpoint import load_checkpoint
from affpipe.run.config import load_config
from affpipe.run.data import lineage_of_run, run_data_path
from affpipe.shards.format import checked_index, read_manifest, shards_fingerprint

TINY = {"image_size": 32, "batch_size": 16, "max_steps_per_epoch": 1, "max_val_steps": 3, "loader.num_workers": 0,
        "loader.backend": "torch", "device": "cpu", "log_every": 1, "epochs": 1}


def test_shards_record_their_index_and_their_own_fingerprint(shard_dir, index_dir):
    m = read_manifest(shard_dir)
    assert m["index_fingerprint"] == index_fingerprint(index_dir) and len(m["fingerprint"]) == 16
    assert m["fingerprint"] == shards_fingerprint(m)
    changed = json.loads(json.dumps(m))
    changed["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    assert shards_fingerprint(changed) != m["fingerprint"]
    assert checked_index(shard_dir) == shard_dir / m["index"]


def test_another_index_is_refused_against_the_shards(shard_dir, tmp_path):
    other = make_index(tmp_path)
    with pytest.raises(ValueError, match="do not belong together") as exc:
        checked_index(shard_dir, override=other)
    assert str(other) in str(exc.value) and str(shard_dir) in str(exc.value)
    result = CliRunner().invoke(main, ["train", "--task", "va", "--shards", str(shard_dir), "--index", str(other),
                                       "-o", str(tmp_path / "run"), "--device", "cpu"])
    errors = [line for line in re.split(r"[\r\n]", result.output) if "Error:" in line]
    assert result.exit_code == 1 and len(errors) == 1 and str(other) in errors[0], result.output[-2000:]
    assert "Traceback" not in result.output


def test_a_run_records_what_it_trained_on(shard_dir, index_dir, tmp_path):
    from affpipe.runs.train import train

    run = train(load_config(None, {"task": "mtl", "shards": shard_dir, "out": tmp_path / "run", **TINY}))
    lin = lineage_of_run(run)
    assert lin["kind"] == "frames" and lin["table"] == "frames" and lin["features"] is None
    assert not lin["shards"].startswith("/") and not lin["index"].startswith("/")
    assert run_data_path(run, lin["shards"]).resolve() == shard_dir.resolve()
    assert run_data_path(run, lin["index"]).resolve() == index_dir.resolve()
    assert lin["shards_fingerprint"] == read_manifest(shard_dir)["fingerprint"]
    assert lin["index_fingerprint"] == index_fingerprint(index_dir)
    assert load_checkpoint(run / "last.pt")["lineage"] == lin
    assert run_data_path(run, lin["shards"], override=tmp_path) == tmp_path  # a flag wins
    assert run_data_path(run, None, typed="typed/path") == run_data_path(run, None, None, "typed/path")


def test_a_0_2_run_has_no_lineage_and_a_damaged_one_is_named(tmp_path):
    assert lineage_of_run(tmp_path) is None
    (tmp_path / "lineage.json").write_text("{")
    with pytest.raises(ValueError, match="lineage.json"):
        lineage_of_run(tmp_path)
