"""affpipe.lineage: fingerprints depend on values only; mismatches name both sides."""

from __future__ import annotations

import pyarrow as pa
import pytest

from affpipe.index.build import index_fingerprint, load_index
from affpipe.lineage import check, rel_path, resolve_path, table_fingerprint


def _table(videos=("a", "b", "b"), labels=(0, 1, 2)) -> pa.Table:
    return pa.table({"row_id": pa.array([0, 1, 2], pa.int64()), "video": list(videos),
                     "expr": pa.array(labels, pa.int8())})


def test_fingerprint_depends_on_values_not_chunking():
    t = _table()
    assert table_fingerprint(t) == table_fingerprint(pa.concat_tables([t.slice(0, 1), t.slice(1)]))
    assert table_fingerprint(t) != table_fingerprint(_table(videos=("a", "a", "b")))
    assert table_fingerprint(t) != table_fingerprint(_table(labels=(0, 1, 3)))


def test_check_names_both_sides():
    check("index", "abc", "abc", "feats/manifest.json", "data/index")
    check("index", None, "abc", "old", "new")  # an older artifact records nothing: nothing to check
    with pytest.raises(ValueError, match=r"feats/manifest.json was made from index abc, but data/index is index def"):
        check("index", "abc", "def", "feats/manifest.json", "data/index")


def test_paths_stored_relative_resolve_after_a_move(tmp_path):
    run, feats = tmp_path / "a" / "runs" / "r", tmp_path / "a" / "feats"
    stored = rel_path(run, feats)
    assert stored == "../../feats"
    assert resolve_path(tmp_path / "moved" / "runs" / "r", stored).resolve() == (tmp_path / "moved" / "feats").resolve()
    assert resolve_path(run, str(feats)) == feats


def test_index_records_its_fingerprint_and_it_matches_the_table(index_dir):
    rows, meta = load_index(index_dir)
    assert meta["fingerprint"]["frames"] == table_fingerprint(rows) == index_fingerprint(index_dir)
