"""Fused features: tables of the same index joined row for row; others refused naming both."""

from __future__ import annotations

import json

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
