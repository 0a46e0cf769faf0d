"""A feature table is checked against what it was made from when it is opened (issue 17 item 4):
each attack below stops `affpipe train --features` with one ``Error:`` line at open, naming the
table (and the index), never a silent join of features to another frame's labels."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from affpipe.bench import temporal as bench
from affpipe.cli import main
from affpipe.io import atomic_write_text, write_parquet
from affpipe.lineage import table_fingerprint
from affpipe.temporal.features import open_features, read_table, write_table


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """``index/`` and ``feats/`` (manifest with lineage) of a small random table."""
    root = tmp_path_factory.mktemp("lin")
    bench.make_random_table(root, rows=1200, videos=6, dim=16)
    return root


@pytest.fixture
def data(base, tmp_path) -> Path:
    shutil.copytree(base, tmp_path / "d")
    return tmp_path / "d"


def _one_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    out = result.output
    assert result.exit_code == 1 and "Traceback" not in out, out[-2000:]
    errors = [line[line.index("Error:"):] for line in re.split(r"[\r\n]", out) if "Error:" in line]
    assert len(errors) == 1, out[-2000:]
    return errors[0]


def _train(data: Path, *extra: str) -> str:
    return _one_error(["train", "--task", "mtl", "--features", str(data / "feats"), "-o", str(data / "run"),
                       "--device", "cpu", "--epochs", "1", "--batch-size", "4", "--window", "8", *extra])


def _reindex_with_one_more_video(index: Path) -> None:
    """What rerunning `affpipe index` after one more video was added does to the index: the new
    video's rows come first in (video, frame) order, so every later row_id moves."""
    rng = np.random.default_rng(1)
    old = pa.Table.from_batches(pa.parquet.read_table(index / "frames.parquet").to_batches())
    extra = bench._label_table(np.array([25]), rng)
    extra = extra.set_column(1, "video", pa.array(["aaa_new"] * 25))
    table = pa.concat_tables([extra, old])
    table = table.set_column(0, "row_id", pa.array(np.arange(len(table), dtype=np.int64)))
    write_parquet(table, index / "frames.parquet")
    meta = json.loads((index / "index.json").read_text())
    meta["fingerprint"] = {"frames": table_fingerprint(table)}
    atomic_write_text(index / "index.json", json.dumps(meta))


def _manifest(data: Path, **changes) -> None:
    path = data / "feats" / "manifest.json"
    m = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    path.write_text(json.dumps(m))


def test_the_table_opens_and_its_rows_are_the_index_rows(base):
    t = open_features(base / "feats")
    assert t.index == base / "feats" / "../index" and len(t.label_table) >= len(t)


def test_index_rerun_with_one_more_video_stops_train(data):
    _reindex_with_one_more_video(data / "index")
    err = _train(data)
    assert "feature table" in err and str(data / "feats") in err and "index" in err and "do not belong together" in err


def test_index_rerun_caught_by_row_ids_when_the_manifest_has_no_fingerprint(data):
    _manifest(data, index_fingerprint=None)  # a table from before fingerprints
    _reindex_with_one_more_video(data / "index")
    err = _train(data)
    assert "rows do not match the index" in err and "is video" in err


def test_a_manifest_naming_another_index_is_refused(data, tmp_path):
    bench.make_random_table(tmp_path / "other", rows=1300, videos=7, dim=16, seed=5)
    _manifest(data, index=str(tmp_path / "other" / "index"))
    err = _train(data)
    assert str(tmp_path / "other" / "index") in err and "do not belong together" in err


def test_train_index_override_is_checked_against_the_table(data, tmp_path):
    bench.make_random_table(tmp_path / "other", rows=1300, videos=7, dim=16, seed=5)
    err = _train(data, "--index", str(tmp_path / "other" / "index"))
    assert "do not belong together" in err and str(tmp_path / "other" / "index") in err


def _rewrite(data: Path, keep: np.ndarray | None = None, features: np.ndarray | None = None) -> None:
    t = read_table(data / "feats")
    keep = np.arange(len(t)) if keep is None else keep
    feats = np.array(t.features) if features is None else features
    video = np.asarray(t.videos, object)[t.video]
    del t
    write_table(data / "feats" / "features.arrow", row_id=read_table(data / "feats").row_id[keep],
                video=video[keep], frame=read_table(data / "feats").frame[keep],
                split=read_table(data / "feats").split[keep], features=feats[keep])


def test_a_table_missing_every_third_row_is_refused(data):
    n = len(read_table(data / "feats"))
    _rewrite(data, keep=np.flatnonzero(np.arange(n) % 3 != 2))
    err = _train(data)
    assert f"holds {n - n // 3} rows" in err and f"says {n}" in err


def test_width_other_than_the_manifest_is_refused_at_open(data):
    t = read_table(data / "feats")
    narrow = np.ascontiguousarray(np.array(t.features)[:, :8])
    del t
    _rewrite(data, features=narrow)
    err = _train(data)
    assert "width 8" in err and "says 16" in err and "size mismatch" not in err


def test_nan_features_are_refused_at_open_naming_rows_and_video(data):
    t = read_table(data / "feats")
    feats = np.array(t.features)
    val = t.rows_of("val")
    feats[val[:3], 2] = np.nan
    feats[val[5], 0] = np.inf
    first = f"video {t.videos[t.video[val[0]]]} frame {int(t.frame[val[0]])}"
    del t
    _rewrite(data, features=feats)
    err = _train(data)
    assert "4 rows hold non-finite features" in err and first in err


def test_features_and_index_moved_together_still_open(data, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.move(str(data), str(moved))
    assert len(open_features(moved / "feats")) > 0


# ---- issue 24: every column a consumer uses is checked against the index -------------------


def test_a_validation_video_relabelled_train_is_refused_at_open(data):
    t = read_table(data / "feats")
    val = t.rows_of("val")
    video = t.videos[t.video[val[0]]]
    rows = val[t.video[val] == t.video[val[0]]]
    split = np.array(t.split, dtype=object)
    split[rows] = "train"  # evaluate would score part of validation as training, train would train on it
    feats, vids = np.array(t.features), np.asarray(t.videos, object)[t.video]
    row_id, frame = t.row_id.copy(), t.frame.copy()
    del t
    write_table(data / "feats" / "features.arrow", row_id=row_id, video=vids, frame=frame, split=split, features=feats)
    with pytest.raises(ValueError, match=rf"{len(rows)} rows carry another split than in the index .*video {video} "
                                         r"frame \d+ .* is 'train' here, val there"):
        open_features(data / "feats")
    err = _train(data)
    assert "carry another split" in err


def test_weights_with_features_is_refused_not_ignored(data, tmp_path):
    (tmp_path / "w.pt").write_bytes(b"x")
    result = CliRunner().invoke(main, ["train", "--task", "mtl", "--features", str(data / "feats"), "-o",
                                       str(data / "run"), "--device", "cpu", "--weights", str(tmp_path / "w.pt")])
    assert result.exit_code == 2 and "Error: --weights initializes a per-frame backbone" in result.output
    assert "--features" in result.output and not (data / "run").exists()
