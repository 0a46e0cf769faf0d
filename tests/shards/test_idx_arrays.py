"""``idx_member_arrays``: the .idx as offset arrays, equal to ``parse_idx`` on every layout."""

from __future__ import annotations

import numpy as np
import pytest

from affpipe.shards.format import idx_member_arrays, parse_idx


def _expected(idx):
    comps = parse_idx(idx)
    return {ext: np.array([c.get(ext, (-1, 0, ""))[:2] for c in comps], np.int64).reshape(-1, 2) for ext in ("jpg", "lbl")}


@pytest.mark.parametrize("lines", [
    ["jpg 512 100 a.jpg lbl 1024 32 a.lbl", "jpg 1536 90 b.jpg lbl 2048 32 b.lbl"],  # affpipe's own (fast path)
    ["lbl 1024 32 a.lbl jpg 512 100 a.jpg", "jpg 1536 90 b.jpg lbl 2048 32 b.lbl"],  # other member order
    ["jpg 512 100 a.jpg", "jpg 1536 90 b.jpg lbl 2048 32 b.lbl"],  # a sample without its .lbl
])
def test_arrays_equal_parse_idx(tmp_path, lines):
    idx = tmp_path / "s.idx"
    idx.write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
    got, exp = idx_member_arrays(idx), _expected(idx)
    for ext in ("jpg", "lbl"):
        assert got[ext].dtype == np.int64 and np.array_equal(got[ext], exp[ext])


def test_bad_index_names_the_line(tmp_path):
    idx = tmp_path / "s.idx"
    idx.write_text("v1.2 1\njpg 512 x a.jpg lbl 1024 32 a.lbl\n")
    with pytest.raises(ValueError, match=r"s\.idx:2: malformed"):
        idx_member_arrays(idx)
