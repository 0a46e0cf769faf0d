import json

import numpy as np
import pytest
from temporal_support import toy_table

from affpipe.temporal.features import merge_parts, read_table, write_part


def test_table_is_a_zero_copy_sorted_view(tmp_path):
    t = toy_table(tmp_path)
    assert t.features.dtype == np.float16 and t.features.shape == (len(t), 8)
    assert not t.features.flags.writeable and not t.features.flags.owndata  # a view of the mapped file
    key = t.video.astype(np.int64) * 1000 + t.frame
    assert (np.diff(key) > 0).all()
    assert set(t.split) == {"train", "val"} and len(t.rows_of("val")) + len(t.rows_of("train")) == len(t)


def test_read_rejects_a_missing_or_foreign_manifest(tmp_path):
    toy_table(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ValueError, match="schema version"):
        read_table(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="affpipe embed"):
        read_table(tmp_path)


def test_parts_merge_sorted_by_video_and_frame(tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.permutation(50)
    feats = np.arange(50 * 4, dtype=np.float16).reshape(50, 4)[ids]
    write_part(tmp_path / "a.arrow", ids[:20], feats[:20])
    write_part(tmp_path / "b.arrow", ids[20:], feats[20:])

    def lookup(r):
        return np.where(r % 2, "odd", "even").astype(object), r // 2 + 1, np.full(len(r), "train", object)

    assert merge_parts([tmp_path / "a.arrow", tmp_path / "b.arrow"], tmp_path, lookup) == 50
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    t = read_table(tmp_path)
    assert list(t.videos) == ["even", "odd"] and (t.row_id[:25] == np.arange(0, 50, 2)).all()
    np.testing.assert_array_equal(t.features[:, 0], t.row_id * 4)
    assert not (tmp_path / "features.scratch").exists()
    write_part(tmp_path / "c.arrow", ids[:1], feats[:1])
    with pytest.raises(ValueError, match="duplicate"):
        merge_parts([tmp_path / "a.arrow", tmp_path / "c.arrow"], tmp_path, lookup)
