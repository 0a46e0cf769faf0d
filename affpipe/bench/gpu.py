"""One GPU benchmark script: ``python -m affpipe.bench.gpu --out DIR`` (``make benchmark-gpu``).

Sized to finish in under 5 minutes on one H100 from a bare tree: only numpy, torch,
torchvision, pyarrow, DALI (+ webdataset) and the affpipe package on PYTHONPATH; no click, no
matplotlib, no network. It

1. makes a small synthetic tree, its index and train shards (~30k frames);
2. times DALI JPEG decoding, ``mixed`` (nvJPEG) against ``cpu`` with one thread per core;
3. times the affpipe DALI loader alone (train augmentation, batches on the GPU);
4. times the trainer's step (ResNet-18 + MultiTaskLoss, AdamW, bf16 autocast, channels_last) at 112 and
   224 px on synthetic tensors already on the GPU, and fed by the DALI loader, with the share
   of step time spent waiting for data;
5. projects one epoch over 2.7M frames;
6. times a SimSiam pre-training step on ResNet-18 at the first size, fed two augmented views of
   every frame by the pre-training loader (DALI on the GPU when importable), against the same
   step on synthetic views: its data-wait share (target < 5%, ``affpipe.bench.pretrain``);

and writes ``DIR/results.json`` and ``DIR/results.md`` and prints the markdown.

``--cpu-smoke`` runs every step with tiny sizes on the CPU (DALI CPU mode; the ``mixed``
decoder row says "needs a GPU"), which the test suite does, so the GPU run is unlikely to fail
on anything but the GPU itself. Each case is isolated: a failure becomes an ``error: …`` row,
and the script exits 1 when any row is an error (with ``AFFPIPE_REQUIRE_GPU=1``, also when a
case needs a GPU or DALI it does not have, or torch sees no CUDA device at all).

A bare GPU host may lack OpenCV and tqdm: without cv2 the data comes from a PIL-only fallback
tree (``--data fallback``; the results say which), without tqdm a silent stand-in lets the
index and shard stages import, and they run in one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from affpipe.bench.common import (
    NEEDS_DALI,
    NEEDS_GPU,
    failed_rows,
    fmt_rate,
    machine_info,
    machine_line,
    measure,
    require_cuda,
    update_marked,
)
from affpipe.bench.gpu_data import ensure_tqdm, gpu_data  # noqa: F401 (ensure_tqdm: re-exported)
from affpipe.dist import usable_cores

log = logging.getLogger("affpipe.bench.gpu")

EPOCH_TARGET_S = 180.0
WAIT_TARGET = 0.05


@dataclass(frozen=True)
class GpuBenchConfig:
    """Sizes of the GPU benchmark; ``smoke()`` gives the tiny CPU variant."""

    out: Path
    videos: int = 80
    frames: int = 500
    batch_size: int = 256
    sizes: tuple[int, ...] = (112, 224)
    seconds: float = 6.0
    max_steps: int = 400
    warmup: int = 15
    repeats: int = 3
    epoch_frames: int = 2_700_000
    device: str = "cuda"
    amp: bool = True  # bf16 autocast
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    markdown: Path | None = None
    data_source: str = "auto"  # "auto" | "synth" | "fallback" (no cv2 on the host)

    def smoke(self) -> GpuBenchConfig:
        return replace(self, videos=3, frames=16, batch_size=8, sizes=(64,), seconds=0.05, max_steps=2, warmup=1, repeats=1, device="cpu")


# ---- cases -----------------------------------------------------------------------------------


def _error(exc: BaseException) -> str:
    log.error("case failed:\n%s", traceback.format_exc())
    return f"error: {type(exc).__name__}: {exc}"


def dali_decode_step(shards: Path, *, decoder: str, batch_size: int, threads: int, seed: int):
    """A step running one batch through reader → ``fn.decoders.image(device=decoder)``."""
    from nvidia.dali import fn, pipeline_def, types

    from affpipe.shards import shard_paths

    pairs = shard_paths(shards, "train")
    gpu = decoder == "mixed"

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=0 if gpu else None, seed=seed, prefetch_queue_depth=2)
    def pipe():
        jpg, lbl = fn.readers.webdataset(
            paths=[str(t) for t, _ in pairs], index_paths=[str(i) for _, i in pairs], ext=["jpg", "lbl"],
            random_shuffle=True, initial_fill=min(1024, 4 * batch_size), name="reader",
        )
        return fn.decoders.image(jpg, device=decoder, output_type=types.RGB), lbl

    p = pipe()
    p.build()

    def step() -> tuple[int, float]:
        images, _ = p.run()
        return len(images), 0.0

    return step


def _dali_present() -> bool:
    from affpipe._optional import dali_available

    return dali_available()


def bench_decode(cfg: GpuBenchConfig, shards: Path) -> list[dict]:
    rows = []
    for decoder in ("mixed", "cpu"):
        label = "DALI decoders.image, mixed (nvJPEG)" if decoder == "mixed" else f"DALI decoders.image, cpu ({usable_cores()} threads)"
        row = {"name": f"decode-{decoder}", "label": label, "status": "ok", "fps": None}
        if decoder == "mixed" and cfg.device != "cuda":
            row["status"] = NEEDS_GPU
        elif not _dali_present():
            row["status"] = NEEDS_DALI
        else:
            try:
                step = dali_decode_step(shards, decoder=decoder, batch_size=cfg.batch_size, threads=usable_cores(), seed=cfg.seed)
                m = measure(step, warmup=cfg.warmup, max_steps=cfg.max_steps, seconds=cfg.seconds, repeats=cfg.repeats, device=cfg.device if decoder == "mixed" else "cpu")
                row.update(m.to_dict())
            except Exception as exc:
                row["status"] = _error(exc)
        rows.append(row)
    return rows


def _dali_loader(cfg: GpuBenchConfig, shards: Path, size: int):
    from affpipe.loaders import make_loader

    # uint8 batches, as the trainers read them (the model normalizes on the device)
    return make_loader(shards, "train", batch_size=cfg.batch_size, train=True, backend="dali", device=cfg.device, image_size=size,
                       seed=cfg.seed, num_workers=usable_cores(), normalize=False)


def bench_size(cfg: GpuBenchConfig, data: dict, table, size: int) -> dict:
    """Loader alone, training on synthetic tensors, training fed by the DALI loader — at one size."""
    from affpipe.bench.cases import TrainStep, close_loader, loader_step

    shards = Path(data["shards"])
    res: dict = {"image_size": size}
    win = dict(warmup=cfg.warmup, max_steps=cfg.max_steps, seconds=cfg.seconds, repeats=cfg.repeats, device=cfg.device)
    dali = _dali_present()
    loader = None
    try:
        loader = _dali_loader(cfg, shards, size) if dali else None
        res["loader"] = ({"status": "ok", "backend": loader.backend, **measure(loader_step(loader, cfg.device), **win).to_dict()}
                         if dali else {"status": NEEDS_DALI, "fps": None})
    except Exception as exc:
        res["loader"] = {"status": _error(exc), "fps": None}
    finally:
        if loader is not None:
            close_loader(loader)
    try:
        trainer = TrainStep(table, device=cfg.device, amp_dtype=torch.bfloat16 if cfg.amp else None, channels_last=cfg.channels_last,
                            seed=cfg.seed, compile=cfg.compile)
    except Exception as exc:
        res["synthetic"] = res["fed"] = {"status": _error(exc), "fps": None}
        return res
    try:
        m = measure(trainer.synthetic_step(cfg.batch_size, size), **win)
        res["synthetic"] = {"status": "ok", **m.to_dict()}
    except Exception as exc:
        res["synthetic"] = {"status": _error(exc), "fps": None}
    if not dali:
        res["fed"] = {"status": NEEDS_DALI, "fps": None}
    else:
        loader = None
        try:
            loader = _dali_loader(cfg, shards, size)
            m = measure(trainer.fed_step(loader), **win)
            res["fed"] = {"status": "ok", **m.to_dict(), "data_wait_share": round(m.wait_share, 4)}
            syn = res["synthetic"].get("fps")
            if syn:
                res["fed"]["slowdown_vs_synthetic"] = round(max(0.0, 1 - m.steady_rate / syn), 4)
            # The benchmark's epochs are short, so their starts (the first batches of an epoch) are
            # timed apart: a 2.7M-frame epoch pays one start and runs at the steady rate.
            res["fed"]["epoch_s"] = round(cfg.epoch_frames / m.steady_rate + (m.restart_cost_s or 0.0), 1)
        except Exception as exc:
            res["fed"] = {"status": _error(exc), "fps": None}
        finally:
            if loader is not None:
                close_loader(loader)
    if res["synthetic"].get("fps"):
        res["synthetic"]["epoch_s"] = round(cfg.epoch_frames / res["synthetic"]["fps"], 1)
    del trainer
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    return res


def run(cfg: GpuBenchConfig) -> dict:
    """Every step in order; writes ``results.json`` and ``results.md`` under ``cfg.out``."""
    require_cuda("bench_gpu", smoke=cfg.device != "cuda")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict = {"schema_version": 1, "kind": "bench-gpu", "machine": machine_info(),
                     "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}}
    log.info("data: %d videos x %d frames", cfg.videos, cfg.frames)
    data = gpu_data(out / "cache", videos=cfg.videos, frames=cfg.frames, seed=cfg.seed, source=cfg.data_source)
    from affpipe.index.build import load_index  # after gpu_data: it may have to stand in for tqdm

    results["data"] = {k: v for k, v in data.items() if k not in ("tree", "index", "shards")}
    table, _ = load_index(Path(data["index"]))
    log.info("decode: DALI mixed vs cpu")
    results["decode"] = bench_decode(cfg, Path(data["shards"]))
    results["sizes"] = []
    for size in cfg.sizes:
        log.info("training at %d px", size)
        results["sizes"].append(bench_size(cfg, data, table, size))
    log.info("pre-training step (SimSiam, two views) at %d px", cfg.sizes[0])
    results["pretrain"] = bench_pretrain_case(cfg, Path(data["shards"]))
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n")
    if cfg.markdown is not None:
        update_marked(Path(cfg.markdown), "bench-gpu", markdown(results), title="GPU (`make benchmark-gpu`)")
    return results


def bench_pretrain_case(cfg: GpuBenchConfig, shards: Path) -> dict:
    """The pre-training row (``affpipe.bench.pretrain``), isolated like every case."""
    try:
        from affpipe.bench.pretrain import bench_pretrain

        row = bench_pretrain(shards, device=cfg.device, batch_size=cfg.batch_size, image_size=cfg.sizes[0],
                             seed=cfg.seed, warmup=cfg.warmup, max_steps=cfg.max_steps, seconds=cfg.seconds,
                             repeats=cfg.repeats)
        return {**row, "status": "ok"}
    except Exception as exc:  # noqa: BLE001 (a failed case is a row, the others still run)
        return {"name": "pretrain-simsiam", "status": _error(exc)}
    finally:
        if cfg.device == "cuda":
            torch.cuda.empty_cache()


def case_rows(results: dict) -> list[dict]:
    """Every case of a results dict as a row with ``name`` and ``status``."""
    rows = list(results.get("decode", []))
    for s in results.get("sizes", []):
        rows += [{"name": f"{part}-{s['image_size']}px", **s[part]} for part in ("loader", "synthetic", "fed") if part in s]
    if "pretrain" in results:
        rows.append(results["pretrain"])
    return rows


def _cell(row: dict, key: str = "fps", fmt=fmt_rate) -> str:
    if not row:
        return "—"
    return fmt(row.get(key)) if row.get("status") == "ok" else row.get("status", "—")


def _dep(row: dict, key: str, fmt) -> str:
    """A figure derived from a case: blank when the case itself failed (its cell says why)."""
    return fmt(row.get(key)) if row.get("status") == "ok" else "—"


def markdown(results: dict) -> str:
    """The GPU section: decoders, then per image size loader / synthetic / fed figures."""
    m, cfg = results["machine"], results["config"]
    d = results.get("data", {})
    lines = [
        f"Measured {m['date']} on {machine_line(m)}.",
        "",
        f"Data: {d.get('source', 'synthetic')}, {d.get('train_samples', 0):,} train frames in shards. Batch {cfg['batch_size']}; "
        f"training: ResNet-18 + MultiTaskLoss, the trainer's AdamW step, {'bf16 autocast' if cfg['amp'] else 'fp32'}"
        f"{', channels_last' if cfg['channels_last'] else ''}{', torch.compile' if cfg['compile'] else ''}. "
        f"Median of {cfg['repeats']} windows of ≤ {cfg['seconds']} s after {cfg['warmup']} warm-up steps. "
        f"Whole run {results['wall_s']:.0f} s.",
        "",
        "| JPEG decoding (no augmentation) | frames/s |",
        "|---|---:|",
    ]
    lines += [f"| {r['label']} | {_cell(r)} |" for r in results["decode"]]
    lines += [
        "",
        "| image size | DALI loader alone | train step, synthetic tensors | train step fed by DALI | waiting for data | slowdown vs synthetic | epoch of "
        f"{cfg['epoch_frames'] / 1e6:.1f}M frames |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    pct = lambda x: "—" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    secs = lambda x: "—" if x is None else f"{x:.0f} s"  # noqa: E731
    for s in results["sizes"]:
        fed = s.get("fed", {})
        lines.append(
            f"| {s['image_size']} | {_cell(s.get('loader', {}))} | {_cell(s.get('synthetic', {}))} | {_cell(fed)} | "
            f"{_dep(fed, 'data_wait_share', pct)} | {_dep(fed, 'slowdown_vs_synthetic', pct)} | {_dep(fed, 'epoch_s', secs)} |"
        )
    first = results["sizes"][0] if results["sizes"] else {}
    fed = first.get("fed", {})
    if fed.get("status") == "ok":
        wait_ok = fed["data_wait_share"] < WAIT_TARGET
        epoch_ok = fed["epoch_s"] <= EPOCH_TARGET_S
        lines += ["", f"Targets at {first['image_size']} px: data wait < {WAIT_TARGET:.0%}: {'met' if wait_ok else 'not met'} "
                  f"({pct(fed['data_wait_share'])}); one epoch ≤ {EPOCH_TARGET_S:.0f} s: {'met' if epoch_ok else 'not met'} "
                  f"({secs(fed['epoch_s'])}, projected from the fed step rate)."]
    p = results.get("pretrain")
    if p is not None:
        lines += ["", "| pre-training step (SimSiam, ResNet-18, 2 views) | frames/s | waiting for data | target |",
                  "|---|---:|---:|---:|"]
        if p.get("status") == "ok":
            lines += [f"| fed by the pre-training loader (`{p['backend']}`), {p['image_size']} px, batch {p['batch_size']} | "
                      f"{fmt_rate(p.get('fps'))} | {pct(p.get('data_wait_share'))} | < {WAIT_TARGET:.0%}: "
                      f"{'met' if p.get('met') else 'not met'} |",
                      f"| synthetic views (compute ceiling) | {fmt_rate(p.get('synthetic_fps'))} | 0 | |",
                      f"| the loader alone | {fmt_rate(p.get('loader_fps'))} | | |"]
        else:
            lines.append(f"| pre-training step | {p.get('status')} | | |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> GpuBenchConfig:
    ap = argparse.ArgumentParser(prog="python -m affpipe.bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, cache/)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing useful")
    ap.add_argument("--videos", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--sizes", type=str, help="comma-separated image sizes, e.g. 112,224")
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (adds compile time)")
    ap.add_argument("--data", choices=("auto", "synth", "fallback"), default="auto",
                    help="synthetic data: affpipe.synth.generate (needs cv2), a cv2-free fallback, or auto")
    ap.add_argument("--markdown", type=Path, help="also replace the bench-gpu:start/end section of this file")
    a = ap.parse_args(argv)
    cfg = GpuBenchConfig(out=a.out)
    if a.cpu_smoke:
        cfg = cfg.smoke()
    over = {k: v for k, v in {"videos": a.videos, "frames": a.frames, "batch_size": a.batch_size, "seconds": a.seconds, "repeats": a.repeats}.items() if v is not None}
    if a.sizes:
        over["sizes"] = tuple(int(s) for s in a.sizes.split(","))
    if a.no_amp:
        over["amp"] = False
    if a.compile:
        over["compile"] = True
    if a.markdown:
        over["markdown"] = a.markdown
    over["data_source"] = a.data
    return replace(cfg, **over)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = parse_args(argv)
    results = run(cfg)
    sys.stdout.write(json.dumps(results, indent=1) + "\n\n" + markdown(results) + "\n")
    failed = failed_rows(case_rows(results))
    if failed:  # the results are written; the exit status says the run is not whole
        log.error("%d case(s) did not run:\n  %s", len(failed), "\n  ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
