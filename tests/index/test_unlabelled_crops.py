"""Every crop of a twin tree is indexed, labelled or not (the rows pre-training reads)."""

from __future__ import annotations

from affpipe.index.build import IndexConfig, build_index, load_index
from affpipe.synth.generate import SynthConfig, generate


def test_every_crop_on_disk_is_a_row_labelled_or_not(tmp_path):
    root = tmp_path / "tree"
    generate(SynthConfig(out=root, layout="abaw6", videos=6, frames=40, seed=1, test_videos=1))
    # a crop no annotation line names (past the end of every file of its video)
    folder = next(p for p in sorted((root / "cropped_aligned").iterdir()) if p.is_dir())
    (folder / "09999.jpg").write_bytes(next(iter(sorted(folder.glob("*.jpg")))).read_bytes())
    counts = build_index(IndexConfig(root=root, out=tmp_path / "index", workers=1))
    tbl, _ = load_index(tmp_path / "index")
    col = lambda n: tbl.column(n).to_numpy(zero_copy_only=False)  # noqa: E731
    on_disk = {p.relative_to(p.parents[1]).as_posix() for p in root.rglob("*.jpg")}
    has = col("has_image")
    assert set(col("image")[has].tolist()) == on_disk  # no crop is left out, named by a line or not
    labelled = col("va_valid") | col("expr_valid") | col("au_valid")
    split = col("split")
    extra = [r for r in tbl.to_pylist() if r["video"] == folder.name and r["frame"] == 9999]
    assert len(extra) == 1 and extra[0]["has_image"]
    assert not (extra[0]["va_valid"] or extra[0]["expr_valid"] or extra[0]["au_valid"])  # indexed, no label
    assert (has & ~labelled & (split != "test")).any()
    assert counts["images_without_line"] > 0 and (has & (split == "test")).any()

    assert counts["unlabelled_crops"] == {s: int((has & ~labelled & (split == s)).sum()) for s in ("train", "val", "test")}
