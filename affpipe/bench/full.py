"""``affpipe bench-full``: the data stages at full Aff-Wild2 scale (~2.9M frames).

Stages, each timed on its own: the synthetic full-scale tree (hard-linked image pool, so it
costs inodes rather than gigabytes; reused on reruns with the same parameters), the index of
the whole tree, the naive index baseline on the same tree (on a subset of whole videos scaled
linearly to the full frame count when the tree is too large — the results say which), and shard
writing of a large train subset (whole videos, default ≥ 300k frames; the shard folder is
emptied first so nothing is resumed). Outputs ``<out>/results.json`` and the section between
the ``<!-- bench-full:start -->``/``<!-- bench-full:end -->`` markers of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from affpipe.bench.common import fmt_rate, machine_info, machine_line, update_marked
from affpipe.dist import usable_cores
from affpipe.io import jsonable

log = logging.getLogger(__name__)

INDEX_TARGET_S = 60.0
SHARD_TARGET_FPS = 20_000.0


@dataclass(frozen=True)
class BenchFullConfig:
    """Options of ``affpipe bench-full``; ``full_scale=False`` uses ``videos`` × ``frames`` (tests)."""

    out: Path
    full_scale: bool = True
    videos: int = 24
    frames: int = 300
    seed: int = 0
    shard_frames: int = 300_000
    naive_frames: int = 500_000
    workers: int = 0  # 0 = the usable cores
    markdown: Path | None = Path("BENCHMARKS.md")

    def __post_init__(self) -> None:
        if self.shard_frames < 1 or self.naive_frames < 1:
            raise ValueError("shard_frames and naive_frames must be >= 1")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    res = fn(*args, **kwargs)
    return res, time.perf_counter() - t0


def stage_synth(cfg: BenchFullConfig, tree: Path) -> dict:
    """Generate (or reuse) the tree; the summary with the generation time."""
    from affpipe.synth.generate import FULL_SCALE_FRAMES, FULL_SCALE_VIDEOS, SynthConfig, generate

    # --full-scale means Aff-Wild2's size; videos/frames only size the --small tree (tests)
    videos, frames = (FULL_SCALE_VIDEOS, FULL_SCALE_FRAMES) if cfg.full_scale else (cfg.videos, cfg.frames)
    params = {"full_scale": cfg.full_scale, "videos": videos, "frames": frames, "seed": cfg.seed, "layout": "abaw6",
              "mtl": True}
    stamp = tree.parent / "synth.json"
    if stamp.is_file() and (tree / "synth_truth.parquet").is_file():
        done = json.loads(stamp.read_text())
        if done.get("params") == params:
            log.info("reusing the synthetic tree %s (generated in %.0f s)", tree, done["seconds"])
            return {**done, "reused": True}
    if tree.exists():
        shutil.rmtree(tree)
    sc = SynthConfig(out=tree, layout="abaw6", videos=videos, frames=frames, seed=cfg.seed, full_scale=cfg.full_scale,
                     mtl=True)
    summary, seconds = _timed(generate, sc)
    done = {"params": params, "seconds": round(seconds, 2), "summary": jsonable(summary)}
    stamp.write_text(json.dumps(done, indent=1) + "\n")
    return {**done, "reused": False}



def stage_index(tree: Path, out: Path, workers: int) -> dict:
    """Time ``build_index`` on the whole tree."""
    from affpipe.index.build import IndexConfig, build_index

    if out.exists():
        shutil.rmtree(out)
    counts, seconds = _timed(build_index, IndexConfig(root=tree, out=out, workers=workers))
    frames = int(counts["frames"])
    return {"seconds": round(seconds, 2), "frames": frames, "videos": counts.get("videos"), "fps": round(frames / seconds, 1), "workers": workers, "target_s": INDEX_TARGET_S, "met": seconds <= INDEX_TARGET_S}


def pick_videos(table: pa.Table, min_frames: int, seed: int, *, split: str | None = None, image_only: bool = False) -> list[str]:
    """Whole videos in a seeded order until they hold ``min_frames`` rows (all if fewer)."""
    if split is not None:
        table = table.filter(pc.equal(table.column("split"), split))
    if image_only:
        table = table.filter(pc.equal(table.column("has_image"), True))
    counts = pc.value_counts(table.column("video")).to_pylist()
    sizes = {c["values"]: c["counts"] for c in counts}
    names = sorted(sizes)
    order = np.random.default_rng(seed).permutation(len(names))
    picked, total = [], 0
    for i in order:
        if total >= min_frames:
            break
        picked.append(names[i])
        total += sizes[names[i]]
    return sorted(picked)


def subset_tree(tree: Path, dst: Path, videos: set[str]) -> Path:
    """Hard-link the annotation files and image folders of ``videos`` into ``dst``.

    The challenge and image-root folders keep their relative paths, so the layout finder sees
    the same edition; the MTL files are left out (they span every video).
    """
    if dst.exists():
        shutil.rmtree(dst)
    for dirpath, dirnames, filenames in os.walk(tree):
        rel = Path(dirpath).relative_to(tree)
        keep_dirs = []
        for d in dirnames:
            if d in videos:  # an image folder of a chosen video: link it whole, do not walk it
                (dst / rel / d).mkdir(parents=True, exist_ok=True)
                with os.scandir(Path(dirpath) / d) as it:
                    for e in it:
                        os.link(e.path, dst / rel / d / e.name)
            elif not _looks_like_video_dir(Path(dirpath) / d, videos):
                keep_dirs.append(d)
        dirnames[:] = keep_dirs
        for f in filenames:
            if f.endswith(".txt") and f[:-4] in videos:
                (dst / rel).mkdir(parents=True, exist_ok=True)
                os.link(Path(dirpath) / f, dst / rel / f)
    return dst


def _looks_like_video_dir(path: Path, videos: set[str]) -> bool:
    """A folder of frames of a video that was not chosen: skip it instead of walking 5k files."""
    with os.scandir(path) as it:
        for e in it:
            return e.is_file() and e.name.lower().endswith(".jpg")
    return False


def stage_naive(tree: Path, table: pa.Table, out: Path, cfg: BenchFullConfig) -> dict:
    """Time the naive index on the tree, or on a subset of whole videos scaled to the tree."""
    from affpipe.bench.naive_index import naive_index

    total = len(table)
    videos = pick_videos(table, cfg.naive_frames, cfg.seed)
    all_videos = len(set(table.column("video").to_pylist()))
    root = tree
    sub_frames = total
    if len(videos) < all_videos:
        root = subset_tree(tree, out / "naive_subset_tree", set(videos))
        sub_frames = int(pc.sum(pc.is_in(table.column("video"), pa.array(videos))).as_py())
    res, seconds = _timed(naive_index, root)
    scaled = len(videos) < all_videos
    full_s = seconds * total / sub_frames if scaled else seconds
    row = {
        "seconds_measured": round(seconds, 4), "frames_measured": sub_frames, "videos_measured": len(videos),
        "scaled": scaled, "seconds": round(full_s, 3), "frames": total, "fps": round(sub_frames / seconds, 1),
        "note": (f"measured on {len(videos)} of {all_videos} videos ({sub_frames:,} frames), scaled linearly to {total:,} frames"
                 if scaled else "measured on the whole tree"),
    }
    if hasattr(res, "num_rows"):
        row["rows_returned"] = int(res.num_rows)
    if scaled:
        shutil.rmtree(root, ignore_errors=True)
    return row


def subset_index(index: Path, dst: Path, videos: list[str]) -> Path:
    """An index folder holding only ``videos``' rows (row ids kept), for sharding a subset."""
    from affpipe.index.build import load_index

    table, meta = load_index(index)
    table = table.filter(pc.is_in(table.column("video"), pa.array(videos)))
    dst.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dst / "frames.parquet")
    meta = {**meta, "subset_of": str(Path(index).resolve()), "subset_videos": len(videos)}
    (dst / "index.json").write_text(json.dumps(meta, indent=1) + "\n")
    return dst


def stage_shard(index: Path, table: pa.Table, out: Path, cfg: BenchFullConfig, workers: int) -> dict:
    """Write train shards of a subset of whole train videos (≥ ``shard_frames`` frames) from scratch."""
    from affpipe.shards.write import ShardConfig, write_shards

    videos = pick_videos(table, cfg.shard_frames, cfg.seed, split="train", image_only=True)
    sub = subset_index(index, out / "shard_index", videos)
    shards = out / "shards"
    if shards.exists():
        shutil.rmtree(shards)  # a resumed run would time nothing
    manifest, seconds = _timed(write_shards, ShardConfig(index=sub, out=shards, split="train", workers=workers, seed=cfg.seed))
    sp = manifest["splits"]["train"]
    all_train = int(pc.sum(pc.and_(pc.equal(table.column("split"), "train"), table.column("has_image"))).as_py())
    return {
        "seconds": round(seconds, 2), "samples": sp["samples"], "bytes": sp["bytes"], "shards": len(sp["shards"]),
        "fps": round(sp["samples"] / seconds, 1), "mb_per_s": round(sp["bytes"] / seconds / 1e6, 1), "workers": workers,
        "videos": len(videos), "train_frames_with_image": all_train, "skipped": sp["skipped"],
        "note": f"{len(videos)} whole train videos, {sp['samples']:,} of {all_train:,} train frames with an image",
        "target_fps": SHARD_TARGET_FPS, "met": sp["samples"] / seconds >= SHARD_TARGET_FPS,
    }


def run_bench_full(cfg: BenchFullConfig) -> dict:
    """Run every stage, write ``results.json`` and the BENCHMARKS.md section."""
    from affpipe.index.build import load_index

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    workers = cfg.workers or usable_cores()
    t_start = time.perf_counter()
    stages: dict[str, dict] = {}
    log.info("stage 1/4: synthetic tree")
    stages["synth"] = stage_synth(cfg, out / "tree")
    log.info("stage 2/4: index")
    stages["index"] = stage_index(out / "tree", out / "index", workers)
    table, _ = load_index(out / "index")
    log.info("stage 3/4: naive index baseline")
    try:
        stages["naive_index"] = stage_naive(out / "tree", table, out, cfg)
        stages["index"]["speedup_vs_naive"] = round(stages["naive_index"]["seconds"] / stages["index"]["seconds"], 1)
    except Exception as exc:  # the baseline is context, not the product: report and go on
        log.exception("naive index baseline failed")
        stages["naive_index"] = {"status": f"error: {type(exc).__name__}: {exc}"}
    log.info("stage 4/4: shards")
    stages["shard"] = stage_shard(out / "index", table, out, cfg, workers)
    results = {
        "schema_version": 1, "kind": "bench-full", "machine": machine_info(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "stages": stages, "wall_s": round(time.perf_counter() - t_start, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if cfg.markdown is not None:
        update_marked(Path(cfg.markdown), "bench-full", full_markdown(results), title="Data stages at full scale (`make benchmark-full`)")
    return results


def _secs(x: float) -> str:
    return f"{x:.1f} s" if x < 100 else f"{x:,.0f} s"


def full_markdown(results: dict) -> str:
    """The ``bench-full`` section: one row per stage."""
    s, m = results["stages"], results["machine"]
    syn, idx, nv, sh = s["synth"], s["index"], s["naive_index"], s["shard"]
    scale = "full scale (`--full-scale`)" if results["config"]["full_scale"] else f"{results['config']['videos']} videos × {results['config']['frames']} frames"
    lines = [
        f"Measured {m['date']} on {machine_line(m)}; {idx['workers']} worker processes.",
        "",
        f"Tree: synthetic, {scale}, {idx['frames']:,} label-table rows, {idx.get('videos')} videos.",
        "",
        "| stage | time | frames/s | target | notes |",
        "|---|---:|---:|---|---|",
        f"| synth tree | {_secs(syn['seconds'])} | — | — | {'reused from an earlier run' if syn.get('reused') else 'generated in this run'} |",
        f"| index (`affpipe index`) | {_secs(idx['seconds'])} | {fmt_rate(idx['fps'])} | ≤ {INDEX_TARGET_S:.0f} s: {'met' if idx['met'] else 'not met'} | "
        f"{idx.get('speedup_vs_naive', '—')}× the naive index |",
    ]
    if "status" in nv:
        lines.append(f"| naive index baseline | — | — | — | {nv['status']} |")
    else:
        lines.append(f"| naive index baseline | {_secs(nv['seconds'])}{' (scaled)' if nv['scaled'] else ''} | {fmt_rate(nv['fps'])} | — | {nv['note']} |")
    lines.append(
        f"| shard writing (`affpipe shard`) | {_secs(sh['seconds'])} | {fmt_rate(sh['fps'])} | ≥ {SHARD_TARGET_FPS:,.0f}/s: "
        f"{'met' if sh['met'] else 'not met'} | {sh['note']}; {sh['bytes'] / 1e9:.2f} GB in {sh['shards']} shards, {sh['mb_per_s']} MB/s |"
    )
    if results["config"]["full_scale"]:
        lines += ["", "At full scale the synthetic frames are hard links to a small pool of rendered faces, so shard "
                  "writing reads mostly page-cached files; on real data with a cold cache, disk reads bound it."]
    return "\n".join(lines)
