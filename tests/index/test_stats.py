"""Stats: stats.md and the three PNGs, with the counts of the label table."""

from __future__ import annotations

import pytest

from affpipe.index.build import IndexConfig, build_index
from affpipe.index.stats import split_summary, write_stats
from affpipe.labels import AU_NAMES, EXPR_CLASSES


def _tree(root):
    (root / "ann" / "EXPR_Set" / "Train_Set").mkdir(parents=True)
    (root / "ann" / "EXPR_Set" / "Train_Set" / "a.txt").write_text(",".join(EXPR_CLASSES) + "\n0\n0\n3\n-1\n")
    (root / "ann" / "AU_Set" / "Validation_Set").mkdir(parents=True)
    (root / "ann" / "AU_Set" / "Validation_Set" / "b.txt").write_text(
        ",".join(AU_NAMES) + "\n" + ",".join(["1"] * 12) + "\n" + ",".join(["0"] * 11 + ["1"]) + "\n")
    (root / "ann" / "VA_Set" / "Train_Set").mkdir(parents=True)
    (root / "ann" / "VA_Set" / "Train_Set" / "a.txt").write_text("valence,arousal\n0.5,0.5\n-0.5,0.25\n")
    (root / "cropped_aligned" / "a").mkdir(parents=True)
    (root / "cropped_aligned" / "a" / "00001.jpg").write_bytes(b"x")


def test_stats_writes_markdown_and_plots(tmp_path):
    _tree(tmp_path / "t")
    build_index(IndexConfig(root=tmp_path / "t", out=tmp_path / "i"))
    md = write_stats(tmp_path / "i", tmp_path / "s")
    text = md.read_text()
    for png in ("expr_distribution.png", "au_prevalence.png", "va_hist2d.png"):
        assert (tmp_path / "s" / png).stat().st_size > 5000
        assert f"]({png})" in text
    assert "| Neutral | 2 (66.7%) | 0 (-) |" in text
    assert "| AU26 | 0 / 0 (-) | 2 / 2 (100.0%) |" in text
    assert "| frames | 4 | 2 |" in text
    assert "| EXPR | train | 1 | 4 | 3 | 1 |" in text


def test_split_summary_counts(tmp_path):
    from affpipe.index.build import load_index

    _tree(tmp_path / "t")
    build_index(IndexConfig(root=tmp_path / "t", out=tmp_path / "i"))
    s = split_summary(load_index(tmp_path / "i")[0])
    assert s["train"]["expr_counts"] == [2, 0, 0, 1, 0, 0, 0, 0]
    assert s["val"]["au_pos"] == [1] * 11 + [2]
    assert s["train"]["va_valid"] == 2 and s["train"]["with_image"] == 1
    assert s["train"]["valence"].tolist() == pytest.approx([0.5, -0.5])


def test_stats_on_synth_index(index_dir, tmp_path):
    md = write_stats(index_dir, tmp_path / "s")
    assert "## MTL subset" in md.read_text()
