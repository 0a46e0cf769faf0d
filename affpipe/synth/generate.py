"""`affpipe synth`: a faithful synthetic twin of the Aff-Wild2 tree, with its ground truth.

The tree follows one ABAW edition's conventions (annotation root name, challenge folders,
7 or 8 expression classes, one or two image roots, the MTL files) and reproduces the
irregularities an indexer must handle: invalid markers in runs, frames with a label but no
image, annotation files longer or shorter than the image folder, ``_left``/``_right``
two-subject videos, a video in Train_Set for one task and Validation_Set for another, videos
not annotated for every task, imbalanced expression classes. Faces are drawn from the same
per-frame latent state the labels come from (``affpipe.synth.faces``), so models can learn.

``synth_truth.parquet`` holds what an index of the tree must reproduce. Every random draw
comes from ``np.random.default_rng([seed, video_idx, stream])``, so one seed gives one
byte-identical tree, and a video can be skipped on resume without shifting the others.

The plan of the tree and the loop that writes it, resumably, are here; the types they share
(``affpipe.synth.config``), the editions, the annotation text and the face images are in their
own modules.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from affpipe.io import write_parquet
from affpipe.labels import AU_NAMES, EXPR_INVALID, TASKS
from affpipe.synth.config import SynthConfig, VideoPlan
from affpipe.synth.editions import HEADERS, IMAGE_ROOTS, LAYOUTS, Edition  # noqa: F401  (re-exported)
from affpipe.synth.faces import FaceRenderer, Latent, run_mask, simulate
from affpipe.synth.images import _POOL_DIR, _Images, _pool_latents, _pool_walk
from affpipe.synth.testset import test_membership, test_video_names, write_test_sets
from affpipe.synth.text import (
    _au_text,
    _expr_text,
    _task_files,
    _va_text,
    _write_annotations,
    _write_file,
)

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
FULL_SCALE_VIDEOS = 560  # Aff-Wild2's size: ~560 videos, ~2.9M frames
FULL_SCALE_FRAMES = 5200
TRUTH_FILE = "synth_truth.parquet"
TRUTH_MTL_FILE = "synth_truth_mtl.parquet"
CONFIG_FILE = "synth_config.json"


# --- the plan -------------------------------------------------------------------------------

_RES = ("640x480", "1280x720", "1920x1080", "480x360", "854x480", "484x360", "1080x1920")


def _names(rng: np.random.Generator, n: int) -> list[str]:
    """Aff-Wild2-like video names (``118-30-640x480``, ``video10_1``, ``video59``), unique."""
    ids = rng.permutation(np.arange(1, max(2 * n, 460)))
    vids = rng.permutation(np.arange(1, max(2 * n, 100)))
    out = []
    for k in range(n):
        u = rng.random()
        if k == 0 or u < 0.6:
            out.append(f"{ids[k]}-{rng.choice([24, 25, 30, 30, 60])}-{_RES[rng.integers(len(_RES))]}")
        elif u < 0.85:
            out.append(f"video{vids[k]}")
        else:
            out.append(f"video{vids[k]}_{rng.integers(1, 7)}")
    return out


def _lengths(rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    n, mean = cfg.videos, cfg.frames
    if cfg.full_scale:  # heavy tail: the longest real video has ~47k frames
        raw = np.minimum(rng.lognormal(0.0, 1.0, n), 9.0)
    else:
        raw = rng.uniform(0.7, 1.3, n)
    lens = np.maximum(np.floor(raw / raw.sum() * n * mean), 10).astype(np.int64)
    short = n * mean - int(lens.sum())
    if short > 0:  # keep the total exact
        lens[np.argsort(-raw, kind="stable")[: short % n]] += 1
        lens += short // n
    return lens


def plan_videos(cfg: SynthConfig) -> list[VideoPlan]:
    """Names, lengths, task membership, splits and special roles of every video."""
    rng = np.random.default_rng([cfg.seed, 2**31])
    n = cfg.videos
    names, lens = _names(rng, n), _lengths(rng, cfg)
    plans = [VideoPlan(i, names[i], int(lens[i])) for i in range(n)]
    if n >= 4:  # one video, two subjects
        base = names[0]
        plans[0].name, plans[1].name = f"{base}_left", f"{base}_right"
        plans[1].length = plans[0].length
        plans[0].role, plans[1].role = "left", "right"
    for k, role in ((2, "cross"), (3, "more_lines"), (4, "fewer_lines")):
        if n > k and (role != "cross" or n >= 3):
            plans[k].role = role
    val = rng.random(n) < 0.25
    if n >= 4:
        val[1] = val[0]
    if n >= 3:
        val[2] = True
    if n >= 2 and val.all():
        val[-1] = False
    if n >= 2 and not val.any():
        val[-1] = True
    share = (0.75, 0.5, 0.65) if not cfg.full_scale else (0.72, 0.42, 0.66)
    member = rng.random((n, 3)) < np.array(share)
    member[~member.any(1), 0] = True
    if n >= 3:
        member[2, :2] = True  # the cross-split video: VA in Train_Set, EXPR (and AU) in Validation_Set
    for t in range(3):  # every task gets a train and a val video where possible
        for want in (False, True):
            cand = [i for i in range(n) if val[i] == want and i != 2]
            if cand and not any(member[i, t] for i in cand if val[i] == want):
                member[cand[0], t] = True
    for p in plans:
        for t, task in enumerate(TASKS):
            if member[p.idx, t]:
                cross_train = p.role == "cross" and task == "va"
                p.tasks[task] = "val" if val[p.idx] and not cross_train else "train"
        p.lines = p.images_upto = p.length
        cut = max(2, p.length // 20)
        if p.role == "more_lines":
            p.images_upto = p.length - cut
        elif p.role == "fewer_lines":
            p.lines = p.length - cut
    plans += _test_plans(cfg, plans)
    if LAYOUTS[cfg.layout].image_roots > 1 and n >= 2:
        for i in rng.choice(n, size=max(1, round(0.09 * n)), replace=False):
            plans[i].root = 1
        if n >= 4:
            plans[1].root = plans[0].root
    for i, p in enumerate(plans[n:]):  # test videos: in every image root (ABAW5+: new_50_vids too)
        p.root = i % LAYOUTS[cfg.layout].image_roots
    return plans


def _test_plans(cfg: SynthConfig, plans: list[VideoPlan]) -> list[VideoPlan]:
    """The test videos: crops, no annotation file; their own random streams (see synth.testset)."""
    k = cfg.test_videos
    names = test_video_names(cfg.seed, k, {p.name for p in plans})
    member = test_membership(cfg.seed, k)
    lens = np.random.default_rng([cfg.seed, 2**31 + 2, 3]).uniform(0.7, 1.3, k) * cfg.frames
    out = []
    for i in range(k):
        n = max(10, int(lens[i]))
        tasks = tuple(t for j, t in enumerate(TASKS) if member[i, j])
        out.append(VideoPlan(len(plans) + i, names[i], n, {}, 0, 0, n, "test", tasks))
    return out


# --- per-video labels -----------------------------------------------------------------------


def _frames(plan: VideoPlan, lat: Latent, rng: np.random.Generator, expr_classes: int,
            au_names: tuple[str, ...] = AU_NAMES) -> dict[str, np.ndarray]:
    """Truth columns of one video's frames 1..length (image presence, annotations, labels)."""
    n = plan.length
    run = float(np.clip(n / 15, 2, 150))
    has_image = (np.arange(n) < plan.images_upto) & ~run_mask(rng, n, 0.02, 3.0)
    has_image[0] = True  # a video without any face would not be in the dataset
    inv = {"va": run_mask(rng, n, 0.015, run), "expr": run_mask(rng, n, 0.15, run),
           "au": run_mask(rng, n, 0.03, run)}
    if plan.role:  # tiny trees still show every marker: the special videos get one run each
        for k, m in inv.items():
            if not m.any():
                s = int(rng.integers(0, n - 2))
                m[s: s + 2 + (k == "expr") * n // 10] = True
    lined = np.arange(n) < plan.lines
    annot = {t: lined & (t in plan.tasks) for t in TASKS}
    va_ok = annot["va"] & ~inv["va"]
    expr = lat.expr.copy()
    if expr_classes == 7:
        expr[expr == 7] = EXPR_INVALID  # ABAW1-2 had no "Other": those frames were not labelled
    au_ok = annot["au"] & ~inv["au"]
    out = {
        "has_image": has_image,
        "va_annot": annot["va"], "expr_annot": annot["expr"], "au_annot": annot["au"],
        "valence": np.where(va_ok, lat.va[:, 0], np.nan).astype(np.float32),
        "arousal": np.where(va_ok, lat.va[:, 1], np.nan).astype(np.float32),
        "expr": np.where(annot["expr"] & ~inv["expr"], expr, EXPR_INVALID).astype(np.int8),
    }
    au = np.where(au_ok[:, None], lat.au_labels, -1).astype(np.int8)
    for k, name in enumerate(AU_NAMES):  # an AU the edition's header lacks is not annotated: -1
        out[name] = au[:, k] if name in au_names else np.full(n, -1, np.int8)
    return out


_BOOL = ("has_image", "va_annot", "expr_annot", "au_annot")


def _truth_table(plans: list[VideoPlan], parts: list[dict[str, np.ndarray]], names: list[str]) -> pa.Table:
    lens = [p.length for p in plans]
    cols: dict[str, pa.Array] = {
        "video": pa.array(np.repeat(np.array([p.name for p in plans], dtype=object), lens), pa.string()),
        "frame": pa.array(np.concatenate([np.arange(1, n + 1, dtype=np.int32) for n in lens])),
        "split": pa.array(np.repeat(np.array([p.split for p in plans], dtype=object), lens), pa.string()),
    }
    cat = {k: np.concatenate([fr[k] for fr in parts]) for k in parts[0]}
    for k in (*_BOOL, "valence", "arousal", "expr", *AU_NAMES):
        cols[k] = pa.array(cat[k])
    image, image_dir = [], []
    for p, fr in zip(plans, parts, strict=True):
        prefix = p.name + "/"
        image += [prefix + nm if ok else None for nm, ok in zip(names, fr["has_image"].tolist(), strict=False)]
        image_dir += [IMAGE_ROOTS[p.root]] * p.length
    has = cat["has_image"]
    cols["image"] = pa.array(image, pa.string())
    cols["image_dir"] = pa.array(np.where(has, np.array(image_dir, dtype=object), None), pa.string())
    keep = has | cat["va_annot"] | cat["expr_annot"] | cat["au_annot"]  # no line, no image: no row
    return pa.table(cols).filter(pa.array(keep))



def _write_mtl(cfg: SynthConfig, layout: Edition, ann: Path, truth: pa.Table) -> dict[str, int]:
    """The s-Aff-Wild2-style MTL files (a frame subset, all three tasks per row, a few duplicates)."""
    rng = np.random.default_rng([cfg.seed, 2**31 + 1])
    col = lambda k: truth.column(k).to_numpy(zero_copy_only=False)  # noqa: E731
    au = np.stack([col(a) for a in AU_NAMES], 1)
    labelled = ~np.isnan(col("valence")) | (col("expr") >= 0) | (au >= 0).any(1)
    rate = 0.076 if cfg.full_scale else 0.25  # s-Aff-Wild2: ~0.22M of ~2.9M frames
    pick = col("has_image") & labelled & (rng.random(len(truth)) < rate)
    sub = truth.filter(pa.array(pick))
    sub = sub.set_column(sub.schema.get_field_index("va_annot"), "va_annot", pa.array(np.ones(len(sub), bool)))
    sub = sub.set_column(sub.schema.get_field_index("expr_annot"), "expr_annot", pa.array(np.ones(len(sub), bool)))
    sub = sub.set_column(sub.schema.get_field_index("au_annot"), "au_annot", pa.array(np.ones(len(sub), bool)))
    s = lambda k: sub.column(k).to_numpy(zero_copy_only=False)  # noqa: E731
    sau = np.stack([s(a) for a in AU_NAMES], 1)
    rows = [f"{i},{v},{e},{a}" for i, v, e, a in zip(
        s("image").tolist(), _va_text(s("valence"), s("arousal")), _expr_text(s("expr")), (_au_text(sau) if layout.au_names == AU_NAMES else [','.join(map(str, r)) for r in sau.tolist()]), strict=True)]
    rows_arr = np.array(rows, dtype=object)
    split = s("split")
    counts = {}
    for sp, rel in zip(("train", "val"), layout.mtl_files, strict=True):
        mine = np.flatnonzero(split == sp)
        dup = rng.choice(mine, size=max(1, len(mine) // 200), replace=False) if len(mine) >= 10 else mine[:0]
        order = np.insert(mine, rng.integers(0, len(mine) + 1, size=len(dup)), dup)
        _write_file(ann / rel, HEADERS["mtl"] + "\n" + "".join(r + "\n" for r in rows_arr[order].tolist()))
        counts[f"{sp}_rows"], counts[f"{sp}_duplicates"] = len(order), len(dup)
    write_parquet(sub, Path(cfg.out) / TRUTH_MTL_FILE)
    counts["unique_rows"] = len(sub)
    return counts


# --- entry point ----------------------------------------------------------------------------


def _check_out(cfg: SynthConfig) -> None:
    out = Path(cfg.out)
    mine = {k: v for k, v in asdict(cfg).items() if k != "out"} | {"generator_version": GENERATOR_VERSION}
    cfg_file = out / CONFIG_FILE
    if cfg_file.exists():
        old = json.loads(cfg_file.read_text())
        if old != mine:
            raise ValueError(f"{cfg_file}: {out} was generated with other settings ({old}); "
                             f"use a new folder or delete it")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: folder exists, is not empty and is not a synth tree ({CONFIG_FILE} missing)")
    out.mkdir(parents=True, exist_ok=True)
    _write_file(cfg_file, json.dumps(mine, indent=1) + "\n")


def generate(cfg: SynthConfig) -> dict:
    """Write the synthetic tree and ``synth_truth.parquet`` under ``cfg.out``; return a summary.

    Resumable: a video whose image folder and annotation files exist is kept as it is (the
    same seed would write the same bytes), so an interrupted ``--full-scale`` run continues.
    """
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"unknown layout {cfg.layout!r}; expected one of {', '.join(LAYOUTS)}")
    if cfg.videos < 1 or cfg.frames < 10:
        raise ValueError(f"need videos >= 1 and frames >= 10, got videos={cfg.videos} frames={cfg.frames}")
    t_start = time.perf_counter()
    layout = LAYOUTS[cfg.layout]
    out = Path(cfg.out)
    _check_out(cfg)
    ann = out / layout.annotation_root
    for folder in layout.folders.values():
        for sd in layout.split_dirs:
            (ann / folder / sd).mkdir(parents=True, exist_ok=True)
    roots = [out / IMAGE_ROOTS[k] for k in range(layout.image_roots)]
    for r in roots:
        r.mkdir(exist_ok=True)
    plans = sorted(plan_videos(cfg), key=lambda p: p.name)  # the truth's (video, frame) order
    images = _Images(out, out / _POOL_DIR if cfg.full_scale else None)
    pool = _pool_latents(cfg) if cfg.full_scale else []
    pool_ready, skipped, parts = False, 0, []
    for plan in tqdm(plans, desc="synth videos", unit="video", disable=len(plans) < 50):
        rng = lambda stream: np.random.default_rng([cfg.seed, plan.idx, stream])  # noqa: E731, B023
        if cfg.full_scale:
            pos = _pool_walk(rng(1), plan.length)
            lat = pool[plan.idx % len(pool)].take(pos)
        else:
            lat = simulate(rng(1), plan.length, float(np.clip(plan.length / 5, 6, 90)))
        fr = _frames(plan, lat, rng(2), layout.expr_classes, layout.au_names)
        parts.append(fr)
        files = _task_files(ann, layout, plan)
        final = roots[plan.root] / plan.name
        if final.is_dir() and all(p.exists() for p in files.values()):
            skipped += 1
            continue
        _write_annotations(files, fr, plan.lines, layout)
        frames = np.flatnonzero(fr["has_image"])
        t0 = time.perf_counter()
        if cfg.full_scale:
            if not pool_ready:
                images.render_pool(cfg, pool)
                pool_ready = True
            images.link(final, plan.idx % len(pool), pos, frames)
        else:
            images.render(final, FaceRenderer(rng(0)), lat, frames)
        images.images_s += time.perf_counter() - t0
    truth = _truth_table(plans, parts, images.names)
    write_parquet(truth, out / TRUTH_FILE)
    mtl = _write_mtl(cfg, layout, ann, truth) if cfg.mtl else None
    tests = [(p.name, p.length, p.test_tasks, f["has_image"]) for p, f in zip(plans, parts, strict=True) if p.role == "test"]
    test_set = write_test_sets(cfg.layout, ann, tests, layout.folders["expr"], cfg.seed, cfg.mtl)
    if cfg.full_scale:
        shutil.rmtree(out / _POOL_DIR, ignore_errors=True)  # the hard links keep the bytes
    summary = _summary(cfg, layout, plans, parts, images, skipped, mtl, time.perf_counter() - t_start)
    summary["test_set"] = test_set
    return summary


def _summary(cfg, layout, plans, parts, images, skipped, mtl, seconds) -> dict:
    tasks = {}
    for t in TASKS:
        valid = {"va": lambda f: ~np.isnan(f["valence"]), "expr": lambda f: f["expr"] >= 0,
                 "au": lambda f: f["AU1"] >= 0}[t]
        tasks[t] = {
            "train_videos": sum(p.tasks.get(t) == "train" for p in plans),
            "val_videos": sum(p.tasks.get(t) == "val" for p in plans),
            "lines": int(sum(f[f"{t}_annot"].sum() for f in parts)),
            "valid": int(sum(valid(f).sum() for f in parts)),
        }
    out = Path(cfg.out)
    return {
        "out": str(out.resolve()), "layout": cfg.layout, "seed": cfg.seed, "full_scale": cfg.full_scale,
        "annotation_root": layout.annotation_root,
        "image_roots": [IMAGE_ROOTS[k] for k in range(layout.image_roots)],
        "videos": len(plans),
        "split_videos": {s: sum(p.split == s for p in plans) for s in ("train", "val", "test")},
        "frames": int(sum((f["has_image"] | f["va_annot"] | f["expr_annot"] | f["au_annot"]).sum() for f in parts)),
        "images": int(sum(f["has_image"].sum() for f in parts)),
        "rendered": images.rendered, "linked": images.linked, "skipped_videos": skipped,
        "render_fps": round(images.rendered / images.render_s, 1) if images.render_s > 0 else None,
        "images_fps": round((images.rendered + images.linked) / images.images_s, 1) if images.images_s > 0 else None,
        "tasks": tasks, "mtl": mtl, "seconds": round(seconds, 2),
        "truth": str(out / TRUTH_FILE), "truth_mtl": str(out / TRUTH_MTL_FILE) if mtl else None,
        "roles": {p.role: p.name for p in plans if p.role},
    }


def format_summary(s: dict) -> str:
    """Human-readable summary of ``generate``'s result (for the CLI)."""
    lines = [f"synthetic Aff-Wild2 ({s['layout']}, seed {s['seed']}{', full scale' if s['full_scale'] else ''})"
             f" → {s['out']}",
             f"  videos {s['videos']} (train {s['split_videos']['train']}, val {s['split_videos']['val']}), "
             f"frames {s['frames']:,}, images {s['images']:,}"
             + (f"; test {s['split_videos']['test']} (crops, no annotation)" if s["split_videos"].get("test") else ""),
             f"  annotations: {s['annotation_root']}/   images: {', '.join(r + '/' for r in s['image_roots'])}"]
    for t, d in s["tasks"].items():
        lines.append(f"  {t:4s} videos train {d['train_videos']:3d} / val {d['val_videos']:3d}, "
                     f"lines {d['lines']:,}, valid {d['valid']:,}")
    for path in (s.get("test_set") or {}).get("lists", []):
        lines.append(f"  test list: {path}")
    if s["mtl"]:
        m = s["mtl"]
        lines.append(f"  mtl  rows train {m['train_rows']:,} / val {m['val_rows']:,} "
                     f"({m['train_duplicates'] + m['val_duplicates']} duplicates), unique {m['unique_rows']:,}")
    fps = (f"draw+encode {s['render_fps']:,.0f} frames/s (CPU time, one core), images written "
           f"{s['images_fps']:,.0f} frames/s (wall)" if s["render_fps"] else "nothing rendered")
    lines += [f"  rendered {s['rendered']:,}, hard-linked {s['linked']:,}, videos kept from an earlier run "
              f"{s['skipped_videos']}",
              f"  speed: {fps}",
              f"  truth: {s['truth']}" + (f", {s['truth_mtl']}" if s["truth_mtl"] else ""),
              f"  done in {s['seconds']:.1f} s"]
    return "\n".join(lines)
