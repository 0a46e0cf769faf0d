"""The synthetic Aff-Wild2 twin: layouts, determinism, truth == files, irregularities, pixels."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from affpipe.labels import AU_NAMES, NUM_AU
from affpipe.synth.faces import LATENT_AUS, FaceRenderer, simulate
from affpipe.synth.generate import (
    HEADERS,
    IMAGE_ROOTS,
    LAYOUTS,
    TRUTH_FILE,
    TRUTH_MTL_FILE,
    SynthConfig,
    generate,
    plan_videos,
)

SMALL = dict(videos=8, frames=24)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "aw2"
    return out, generate(SynthConfig(out=out, layout="abaw6", seed=3, mtl=True, **SMALL))


def _truth(out: Path, name: str = TRUTH_FILE) -> dict[str, np.ndarray]:
    t = pq.read_table(out / name)
    return {k: t.column(k).to_numpy(zero_copy_only=False) for k in t.column_names}


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_folders_and_headers(tmp_path, layout):
    spec = LAYOUTS[layout]
    generate(SynthConfig(out=tmp_path, layout=layout, mtl=True, videos=6, frames=12))
    ann = tmp_path / spec.annotation_root
    assert ann.is_dir()
    expr_head = HEADERS["expr7"] if spec.expr_classes == 7 else HEADERS["expr8"]
    for task, folder in spec.folders.items():
        for sd in spec.split_dirs:  # ABAW1 (2020): Training_Set
            assert (ann / folder / sd).is_dir()
        files = list((ann / folder).glob("*/*.txt"))
        assert files, f"no {task} files"
        head = {"va": HEADERS["va"], "expr": expr_head, "au": ",".join(spec.au_names)}[task]
        assert all(f.read_text().split("\n", 1)[0] == head for f in files)
    roots = [d.name for d in tmp_path.iterdir() if d.name.startswith("cropped_aligned")]
    assert sorted(roots) == sorted(IMAGE_ROOTS[: spec.image_roots])
    for rel in spec.mtl_files:
        assert (ann / rel).read_text().startswith(HEADERS["mtl"] + "\n")
    if spec.expr_classes == 7:  # no "Other" class in ABAW1-2
        assert _truth(tmp_path)["expr"].max() <= 6


def test_same_seed_same_bytes(tmp_path):
    a = _files(generate(SynthConfig(out=tmp_path / "a", mtl=True, **SMALL)) and tmp_path / "a")
    b = _files(generate(SynthConfig(out=tmp_path / "b", mtl=True, **SMALL)) and tmp_path / "b")
    assert a == b
    c = _files(generate(SynthConfig(out=tmp_path / "c", mtl=True, seed=1, **SMALL)) and tmp_path / "c")
    assert set(a) != set(c) or a != c


def _parse(path: Path) -> tuple[str, list[list[str]]]:
    text = path.read_text()
    assert text.endswith("\n") and "\r" not in text
    head, *rows = text.rstrip("\n").split("\n")
    return head, [r.split(",") for r in rows]


def test_truth_agrees_with_files(tree):
    out, summary = tree
    t = _truth(out)
    spec = LAYOUTS["abaw6"]
    seen = 0
    for task, folder in spec.folders.items():
        for path in (out / spec.annotation_root / folder).glob("*/*.txt"):
            rows = np.flatnonzero(t["video"] == path.stem)
            _, lines = _parse(path)
            annotated = rows[t[f"{task}_annot"][rows]]
            assert len(lines) == len(annotated) and (t["frame"][annotated] == np.arange(1, len(lines) + 1)).all()
            for r, tok in zip(annotated, lines, strict=True):
                if task == "va":
                    v = np.float32(tok[0]), np.float32(tok[1])
                    assert (tok == ["-5", "-5"]) == np.isnan(t["valence"][r])
                    if tok != ["-5", "-5"]:
                        assert (v[0], v[1]) == (t["valence"][r], t["arousal"][r])
                        assert all(len(x.split(".")[1]) <= 3 for x in tok)  # "0.254,-0.11"
                elif task == "expr":
                    assert int(tok[0]) == t["expr"][r]
                else:
                    assert [int(x) for x in tok] == [int(t[a][r]) for a in AU_NAMES]
            seen += len(lines)
    assert seen == sum(d["lines"] for d in summary["tasks"].values())
    # invalid markers occur, and the split rule holds: val if in any Validation_Set
    assert np.isnan(t["valence"][t["va_annot"]]).any() and (t["expr"][t["expr_annot"]] < 0).any()
    for p in plan_videos(SynthConfig(out=out, layout="abaw6", seed=3, mtl=True, **SMALL)):
        assert set(t["split"][t["video"] == p.name]) == {p.split}


def test_mtl_files_and_truth(tree):
    out, summary = tree
    spec = LAYOUTS["abaw6"]
    m = _truth(out, TRUTH_MTL_FILE)
    t = _truth(out)
    rows: list[tuple] = []
    for split, rel in zip(("train", "val"), spec.mtl_files, strict=True):
        head, lines = _parse(out / spec.annotation_root / rel)
        assert head == "image,valence,arousal,expression,aus"
        assert all(len(tok) == 4 + NUM_AU for tok in lines)
        rows += [(split, *tok) for tok in lines]
    assert len(rows) > len(set(rows)) == len(m["video"]) == summary["mtl"]["unique_rows"]  # duplicates
    key = {(v, f): i for i, (v, f) in enumerate(zip(t["video"], t["frame"], strict=True))}
    for i in range(len(m["video"])):
        j = key[(m["video"][i], m["frame"][i])]
        assert m["has_image"][i] and m["split"][i] == t["split"][j]
        assert m["expr"][i] == t["expr"][j] and all(m[a][i] == t[a][j] for a in AU_NAMES)
    for split, img, v, _a, e, *aus in rows[:50]:
        i = np.flatnonzero(m["image"] == img)[0]
        assert m["split"][i] == split and int(e) == m["expr"][i] and [int(x) for x in aus] == [m[k][i] for k in AU_NAMES]
        assert (v == "-5") == np.isnan(m["valence"][i])


def test_images_missing_and_line_mismatch(tree):
    out, summary = tree
    t = _truth(out)
    for i in range(len(t["video"])):
        img = out / t["image_dir"][i] / t["image"][i] if t["has_image"][i] else None
        if img is not None:
            assert img.is_file()
        else:
            assert t["image"][i] is None
            assert not any((out / r / t["video"][i] / f"{t['frame'][i]:05d}.jpg").exists() for r in IMAGE_ROOTS)
    lab = t["va_annot"] | t["expr_annot"] | t["au_annot"]
    assert (lab & ~t["has_image"]).any()  # labels without a face
    assert (lab | t["has_image"]).all() and summary["frames"] == len(t["video"])
    more, fewer = summary["roles"]["more_lines"], summary["roles"]["fewer_lines"]
    m, f = t["video"] == more, t["video"] == fewer
    assert lab[m].sum() > t["has_image"][m].sum() and not t["has_image"][m][-1]
    assert t["has_image"][f][-1] and not lab[f][-1]  # images beyond the last annotation line
    assert summary["images"] == int(t["has_image"].sum())
    assert (out / "cropped_aligned_new_50_vids").is_dir() and any((out / "cropped_aligned_new_50_vids").iterdir())


def test_two_subjects_and_cross_split(tree):
    out, summary = tree
    left, right = summary["roles"]["left"], summary["roles"]["right"]
    assert left.endswith("_left") and right == left[: -len("_left")] + "_right"
    ann = out / LAYOUTS["abaw6"].annotation_root
    for name in (left, right):
        assert list(ann.glob(f"*/*/{name}.txt"))
        assert any((out / r / name).is_dir() for r in IMAGE_ROOTS)
    cross = summary["roles"]["cross"]
    sets = {p.parent.name for p in ann.glob(f"*/*/{cross}.txt")}
    assert sets == {"Train_Set", "Validation_Set"}
    t = _truth(out)
    assert set(t["split"][t["video"] == cross]) == {"val"}
    # not every video is annotated for every task
    names = {p.stem for p in ann.glob("*/*/*.txt") if p.parent.parent.name != "MTL_Challenge"}
    assert any(len(list(ann.glob(f"*/*/{n}.txt"))) < 3 for n in names)


def test_images_decode_112(tree):
    out, _ = tree
    jpgs = sorted((out / "cropped_aligned").rglob("*.jpg"))[::37]
    assert jpgs
    for p in jpgs:
        img = cv2.imread(str(p))
        assert img is not None and img.shape == (112, 112, 3)


def test_each_au_moves_its_feature():
    rng = np.random.default_rng(0)
    r = FaceRenderer(rng)
    zero, va = np.zeros(len(LATENT_AUS), np.float32), np.zeros(2, np.float32)
    base = r.draw(zero, va).astype(np.int16)
    # expected rows (y) of each AU's change, relative to the identity's landmarks
    brows, eyes, mouth = r.eye_y - r.brow_gap, r.eye_y, r.mouth_y
    where = {"AU1": brows, "AU2": brows, "AU4": brows, "AU6": eyes + 4, "AU7": eyes, "AU10": mouth,
             "AU12": mouth, "AU15": mouth, "AU23": mouth, "AU24": mouth, "AU25": mouth, "AU26": mouth + 3}
    for k, name in enumerate(AU_NAMES):
        au = zero.copy()
        au[k] = 1.0
        diff = np.abs(r.draw(au, va).astype(np.int16) - base).sum(2)
        assert diff.sum() > 2000, name
        rows = np.flatnonzero(diff.sum(1) > 0.2 * diff.sum(1).max())
        assert abs(np.average(rows, weights=diff.sum(1)[rows]) - where[name]) < 9, name


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    r = np.argsort(np.argsort(score))
    pos = y == 1
    return float((r[pos].mean() - (pos.sum() - 1) / 2) / (~pos).sum())


def test_labels_follow_latent_and_pixels(tmp_path):
    """Learnability: even a linear model on 28x28 pixels finds AU12 / AU26 in unseen videos."""
    out = tmp_path / "t"
    generate(SynthConfig(out=out, videos=10, frames=100, seed=5))
    t = _truth(out)
    idx = np.flatnonzero(t["has_image"])
    x = np.stack([cv2.resize(cv2.imread(str(out / t["image_dir"][i] / t["image"][i]), cv2.IMREAD_GRAYSCALE),
                             (28, 28), interpolation=cv2.INTER_AREA) for i in idx]).reshape(len(idx), -1)
    x = x.astype(np.float64)
    x = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-3)
    vid = t["video"][idx]
    names = np.unique(vid)
    for au in ("AU12", "AU26"):
        y = t[au][idx]
        aucs = []
        for fold in range(3):  # held-out videos: identity, lighting and pose are new
            test = np.isin(vid, names[fold::3])
            tr, te = (y >= 0) & ~test, (y >= 0) & test
            if len(set(y[te].tolist())) < 2 or len(set(y[tr].tolist())) < 2:
                continue
            a = x[tr]
            w = np.linalg.solve(a.T @ a + 100 * np.eye(a.shape[1]), a.T @ (y[tr] - y[tr].mean()))
            aucs.append(_auc(x[te] @ w, y[te]))
        assert aucs and np.mean(aucs) > 0.75, (au, aucs)
    lat = simulate(np.random.default_rng(1), 3000, 60)
    happy = lat.expr == 4
    assert lat.au_labels[happy, AU_NAMES.index("AU12")].mean() > 0.5 > lat.au_labels[~happy, 6].mean()
    assert np.corrcoef(lat.va[:, 0], happy)[0, 1] > 0.3  # valence agrees with the expression
    assert np.abs(np.diff(lat.va[:, 0])).mean() < 0.05  # smooth in time


def test_full_scale_links_and_resume(tmp_path):
    cfg = SynthConfig(out=tmp_path / "fs", videos=6, frames=40, seed=2, full_scale=True, mtl=True)
    s1 = generate(cfg)
    assert s1["linked"] == s1["images"] and s1["skipped_videos"] == 0
    assert not (tmp_path / "fs" / ".synth_pool").exists()
    jpgs = list((tmp_path / "fs" / "cropped_aligned").rglob("*.jpg"))
    assert len({(p.stat().st_ino) for p in jpgs}) < len(jpgs)  # hard links share bytes
    before = _files(tmp_path / "fs")
    victim = next((tmp_path / "fs" / "cropped_aligned").iterdir())
    shutil.rmtree(victim)
    s2 = generate(cfg)
    assert s2["skipped_videos"] == 5 and 0 < s2["linked"] < s1["linked"]
    assert _files(tmp_path / "fs") == before


def test_bad_config_and_foreign_folder(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        generate(SynthConfig(out=tmp_path / "x", layout="abaw9"))
    generate(SynthConfig(out=tmp_path / "y", videos=2, frames=10))
    with pytest.raises(ValueError, match="other settings"):
        generate(SynthConfig(out=tmp_path / "y", videos=2, frames=10, seed=1))
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a synth tree"):
        generate(SynthConfig(out=tmp_path / "z"))


def test_cli_synth(tmp_path):
    from affpipe.cli import main

    res = CliRunner().invoke(main, ["synth", str(tmp_path / "c"), "--layout", "abaw3", "--videos", "5",
                                    "--frames", "12", "--mtl", "--seed", "4"])
    assert res.exit_code == 0, res.output
    assert "frames/s" in res.output and str((tmp_path / "c").resolve()) in res.output
    assert (tmp_path / "c" / "3rd ABAW Annotations" / "training_set_annotations.txt").is_file()
    digest = hashlib.sha256((tmp_path / "c" / TRUTH_FILE).read_bytes()).hexdigest()
    res = CliRunner().invoke(main, ["synth", str(tmp_path / "c"), "--layout", "abaw3", "--videos", "5",
                                    "--frames", "12", "--mtl", "--seed", "4"])
    assert res.exit_code == 0 and "kept from an earlier run 5" in res.output
    assert hashlib.sha256((tmp_path / "c" / TRUTH_FILE).read_bytes()).hexdigest() == digest
    assert os.path.isdir(tmp_path / "c" / "cropped_aligned")
