"""One whole training epoch on a GPU host, from nothing: ``python -m affpipe.bench.gpu_full``.

``make benchmark-gpu-full``. On one GPU host with ~16 cores it

1. makes the full-scale synthetic Aff-Wild2 twin (560 videos, ~2.9M frames, a rendered face pool
   hard-linked into place; ``--videos N`` makes N such videos instead, a subset the output names);
2. indexes it and writes the train shards (every core);
3. trains the trainer's step (multi-task ResNet-18, AdamW, bf16 autocast, channels_last) for one whole
   epoch over every train frame, fed by the DALI loader with ``mixed`` (nvJPEG) decoding and
   the augmentation on the GPU — the trainers' path;
4. reports each stage's time, the epoch's wall time and frames/s, the share of it spent waiting
   for data, the first batch's wait, and GPU memory (torch's peak and the device's use, which
   includes DALI's buffers); writes ``results.json``/``results.md`` and prints the markdown.

Targets it reports against: data wait < 5% of the epoch; one epoch over ~2.7M frames ≤ 3 min.
It needs numpy, torch, torchvision, pyarrow, OpenCV and tqdm, plus NVIDIA DALI (installed, or its
wheel unpacked onto ``PYTHONPATH``); no click, no matplotlib, no network. ``--cpu-smoke`` runs the same
stages on a tiny tree on the CPU (any loader backend), which the test suite does. A failed stage
exits 1; with ``AFFPIPE_REQUIRE_GPU=1`` so does a run without a CUDA device (``--cpu-smoke``
included) or with another loader than DALI (``--backend torch``, e.g. on a host without DALI).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from affpipe.bench.common import (
    fmt_rate,
    gpu_required,
    machine_info,
    machine_line,
    require_cuda,
    update_marked,
)
from affpipe.dist import usable_cores

log = logging.getLogger("affpipe.bench.gpu_full")

EPOCH_TARGET_S = 180.0
EPOCH_TARGET_FRAMES = 2_700_000
WAIT_TARGET = 0.05
MARKER = "bench-gpu-full"


@dataclass(frozen=True)
class GpuFullConfig:
    """Sizes of the full-epoch run; ``smoke()`` gives the tiny CPU variant the tests run."""

    out: Path
    videos: int | None = None  # None: the full scale (560 videos)
    full_scale: bool = True
    frames: int = 0  # mean frames per video when not full scale (smoke)
    batch_size: int = 256
    device: str = "cuda"
    backend: str = "dali"
    amp: bool = True
    channels_last: bool = True
    seed: int = 0
    image_size: int = 112
    max_steps: int = 0  # 0: the whole epoch
    markdown: Path | None = None

    def smoke(self) -> GpuFullConfig:
        """Tiny tree, small images, the CPU, whichever loader backend is there."""
        return replace(self, videos=3, full_scale=False, frames=16, batch_size=8, image_size=32, device="cpu",
                       backend="auto", amp=False)


def stage_data(cfg: GpuFullConfig, cache: Path, workers: int) -> dict:
    """Synthetic tree → index → train shards (``affpipe.twin.prepare_data``: each stage timed,
    resumable, reused by a rerun with the same parameters)."""
    from affpipe.synth import FULL_SCALE_FRAMES, FULL_SCALE_VIDEOS
    from affpipe.twin import prepare_data

    videos = cfg.videos or FULL_SCALE_VIDEOS
    frames = FULL_SCALE_FRAMES if cfg.full_scale else cfg.frames
    log.info("data: %d videos x ~%d frames%s, %d workers", videos, frames,
             " (full-scale face pool, hard links)" if cfg.full_scale else "", workers)
    data = prepare_data(cache, videos=videos, frames=frames, seed=cfg.seed, workers=workers, full_scale=cfg.full_scale)
    return {**data, "videos": videos, "subset": bool(cfg.full_scale and videos < FULL_SCALE_VIDEOS)}


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"torch_peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "torch_peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
            "device_used_gib": round((total - free) / 2**30, 2), "device_total_gib": round(total / 2**30, 2)}


def stage_epoch(cfg: GpuFullConfig, data: dict, workers: int) -> dict:
    """One whole epoch of the trainers' step fed by the loader; wall time, data wait, memory."""
    from tqdm import tqdm

    from affpipe.bench.cases import TrainStep
    from affpipe.bench.common import sync
    from affpipe.index import load_index
    from affpipe.loaders import make_loader

    device = torch.device(cfg.device)
    table, _ = load_index(Path(data["index"]))
    t0 = time.perf_counter()
    loader = make_loader(Path(data["shards"]), "train", batch_size=cfg.batch_size, train=True, backend=cfg.backend,
                         device=device, image_size=cfg.image_size, seed=cfg.seed, num_workers=workers,
                         normalize=False)
    trainer = TrainStep(table, device=device, amp_dtype=torch.bfloat16 if cfg.amp else None,
                        channels_last=cfg.channels_last, seed=cfg.seed)
    setup_s = round(time.perf_counter() - t0, 2)
    steps = min(len(loader), cfg.max_steps) if cfg.max_steps else len(loader)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wait = first_wait = 0.0
    frames = 0
    sync(device)
    t0 = time.perf_counter()
    it = iter(loader)
    for i in tqdm(range(steps), desc="epoch", unit="batch", mininterval=5.0):
        tw = time.perf_counter()
        batch = next(it)
        w = time.perf_counter() - tw
        wait += w
        if i == 0:
            first_wait = w
        trainer(batch)
        frames += len(batch)
    sync(device)
    wall = time.perf_counter() - t0
    del it
    return {"backend": loader.backend, "setup_s": setup_s, "steps": steps, "frames": frames, "wall_s": round(wall, 2),
            "fps": round(frames / wall, 1), "data_wait_s": round(wait, 2), "data_wait_share": round(wait / wall, 4),
            "first_batch_wait_s": round(first_wait, 2), "whole_epoch": steps == len(loader), **_memory(device)}


def run(cfg: GpuFullConfig) -> dict:
    """Every stage in order; ``results.json`` and ``results.md`` under ``cfg.out``."""
    require_cuda("gpu_full", smoke=cfg.device != "cuda")
    if cfg.backend == "dali":
        from affpipe._optional import dali_available

        if not dali_available():
            raise SystemExit("gpu_full: NVIDIA DALI is not importable (install it, or put its wheel on PYTHONPATH)")
    from affpipe.bench.gpu_data import ensure_tqdm

    workers = usable_cores() if ensure_tqdm() else 1
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict = {"schema_version": 1, "kind": "bench-gpu-full", "machine": machine_info(), "workers": workers,
                     "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}}
    results["data"] = stage_data(cfg, out / "cache", workers)
    results["epoch"] = stage_epoch(cfg, results["data"], workers)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n")
    if cfg.markdown is not None:
        update_marked(Path(cfg.markdown), MARKER, markdown(results), title="A whole epoch on a GPU (`make benchmark-gpu-full`)")
    return results


def markdown(results: dict) -> str:
    """The section: data, stage times, the epoch's figures against the targets."""
    m, d, e, cfg = results["machine"], results["data"], results["epoch"], results["config"]
    st = {k: d["setup_s"].get(k, 0.0) for k in ("synth_s", "index_s", "shard_s")}
    scale = (f"a subset of the full-scale twin ({d['videos']} of 560 videos): " if d.get("subset")
             else "the full-scale twin: " if cfg["full_scale"] else "a small tree: ")
    reused = " (data reused from an earlier run: stage times are that run's)" if d.get("reused") else ""
    partial = "" if e["whole_epoch"] else f", first {e['steps']} steps only"
    projected = e["wall_s"] * EPOCH_TARGET_FRAMES / e["frames"] if e["frames"] else None
    lines = [
        f"Measured {m['date']} on {machine_line(m)}; {results['workers']} worker threads/processes.",
        "",
        f"Data: {scale}{d['index_rows']:,} label-table rows, {d['train_samples']:,} train frames in shards "
        f"({d['train_bytes'] / 1e9:.1f} GB){reused}. Training: the trainer's step (multi-task ResNet-18, AdamW), batch {cfg['batch_size']}, "
        f"{'bf16 autocast' if cfg['amp'] else 'fp32'}{', channels_last' if cfg['channels_last'] else ''}, {cfg['image_size']} px, "
        f"loader `{e['backend']}` on `{cfg['device']}`{partial}. "
        f"Whole run {results['wall_s']:.0f} s.",
        "",
        "| stage | time | frames/s |",
        "|---|---:|---:|",
        f"| synthetic tree | {st['synth_s']:.1f} s | — |",
        f"| index | {st['index_s']:.1f} s | {fmt_rate(d['index_rows'] / st['index_s'] if st['index_s'] else None)} |",
        f"| shard writing (train) | {st['shard_s']:.1f} s | {fmt_rate(d['train_samples'] / st['shard_s'] if st['shard_s'] else None)} |",
        f"| loader + model setup | {e['setup_s']:.1f} s | — |",
        f"| one epoch ({e['steps']:,} steps, {e['frames']:,} frames) | {e['wall_s']:.1f} s | {fmt_rate(e['fps'])} |",
        "",
        f"Waiting for data: {100 * e['data_wait_share']:.1f}% of the epoch ({e['data_wait_s']:.1f} s, of which "
        f"{e['first_batch_wait_s']:.1f} s for the first batch) — target < {WAIT_TARGET:.0%}: "
        f"{'met' if e['data_wait_share'] < WAIT_TARGET else 'not met'}.",
    ]
    if projected is not None and cfg["device"] == "cuda":
        lines.append(f"Epoch time scaled to {EPOCH_TARGET_FRAMES / 1e6:.1f}M frames: {projected:.0f} s — target ≤ "
                     f"{EPOCH_TARGET_S:.0f} s: {'met' if projected <= EPOCH_TARGET_S else 'not met'}.")
    if e.get("device_used_gib") is not None:
        lines.append(f"GPU memory: torch peak {e['torch_peak_allocated_gib']:.1f} GiB allocated "
                     f"({e['torch_peak_reserved_gib']:.1f} GiB reserved); device in use at the end "
                     f"{e['device_used_gib']:.1f} of {e['device_total_gib']:.0f} GiB (includes DALI's buffers).")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> GpuFullConfig:
    ap = argparse.ArgumentParser(prog="python -m affpipe.bench.gpu_full", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, cache/)")
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny tree on the CPU: checks the script, measures nothing useful")
    ap.add_argument("--videos", type=int, help="videos of the full-scale twin to make (default all 560, ~2.9M frames)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--max-steps", type=int, help="stop the epoch after this many steps (default: the whole epoch)")
    ap.add_argument("--backend", choices=("dali", "torch", "auto"),
                    help="loader backend (default dali; torch: the decode threads feed the GPU)")
    ap.add_argument("--markdown", type=Path, help="also replace the bench-gpu-full:start/end section of this file")
    a = ap.parse_args(argv)
    cfg = GpuFullConfig(out=a.out)
    if a.cpu_smoke:
        cfg = cfg.smoke()
    over = {k: v for k, v in {"videos": a.videos, "batch_size": a.batch_size, "max_steps": a.max_steps,
                              "markdown": a.markdown, "backend": a.backend}.items() if v is not None}
    return replace(cfg, **over)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = parse_args(argv)
    if gpu_required() and cfg.backend != "dali":
        log.error("gpu_full: %s is set but the loader backend is %r: the GPU trainers' DALI path goes "
                  "untested (the figures are still written)", "AFFPIPE_REQUIRE_GPU", cfg.backend)
    try:
        results = run(cfg)
    except Exception:  # a stage failed: say so in one place and exit non-zero (SystemExit passes)
        log.exception("gpu_full: a stage failed")
        return 1
    sys.stdout.write(json.dumps(results, indent=1) + "\n\n" + markdown(results) + "\n")
    return 1 if gpu_required() and cfg.backend != "dali" else 0


if __name__ == "__main__":
    sys.exit(main())
