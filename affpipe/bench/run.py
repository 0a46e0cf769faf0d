"""``affpipe bench``: loaders and the training step side by side, in one run, on this machine.

A seeded synthetic Aff-Wild2 twin is generated, indexed and sharded once into ``<out>/cache``
(reused while its parameters match), then every case is timed after a warm-up as the median
of ``repeats`` windows, each bounded by ``max_batches`` batches or ``seconds`` seconds:

- loaders: augmented (flip + ±10° rotation) batches ready on the training device — the
  research's loader; the loaders a user would pick instead (plain WebDataset, LitData, FFCV:
  ``affpipe.bench.peers``, optional extras, rows saying so when missing; LitData's and FFCV's
  conversions are timed apart); affpipe's torch backend (decode threads, worker processes), DALI
  on the CPU, and with CUDA DALI GPU decoding and torchvision's ``decode_jpeg`` (rows say "needs
  a GPU" otherwise);
- the raw decode ceiling (cv2/libjpeg-turbo, one thread, the same JPEG bytes) and the decode
  limit (that × the usable cores), with every loader's share of the limit;
- the trainer's training step (ResNet-18 + MultiTaskLoss, AdamW) on synthetic tensors already on the
  device (the compute ceiling) and fed by each loader, with the share of time spent waiting.

Outputs: ``<out>/results.json``, ``<out>/loaders.png`` and the table between the
``<!-- bench:start -->``/``<!-- bench:end -->`` markers of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from affpipe._optional import dali_available
from affpipe.bench.cases import (
    LOADER_CASES,
    TrainStep,
    build_loader,
    close_loader,
    decode_ceiling_step,
    loader_step,
    read_jpegs,
)
from affpipe.bench.common import (
    NEEDS_DALI,
    NEEDS_GPU,
    cuda_available,
    machine_info,
    measure,
    update_marked,
)
from affpipe.bench.crop import CROP_TITLE, bench_crop, crop_markdown
from affpipe.bench.peers import PEERS, PeerData, PeerMissing, prepare_isolated
from affpipe.dist import usable_cores
from affpipe.twin import prepare_data

log = logging.getLogger(__name__)

# Small shards for the benchmark's ~33k frames, so WebDataset's DataLoader workers (one shard
# each at a time) all get some on a machine with up to ~16 cores; affpipe's loaders do not care.
SAMPLES_PER_SHARD = 2048
NOT_RUN = "not run (--no-peers)"

RESULTS_SCHEMA_VERSION = 1
TARGET_RATIO = 8.0  # the design's aim; the floor is MIN_RATIO
MIN_RATIO = 5.0


@dataclass(frozen=True)
class BenchConfig:
    """Options of ``affpipe bench``. Sizes default to stable figures in < 10 min on 2 cores."""

    out: Path
    videos: int = 48
    frames: int = 1000
    batch_size: int = 128
    train_batch_size: int = 64
    image_size: int = 112
    repeats: int = 3
    seconds: float = 8.0
    max_batches: int = 200
    warmup: int = 3
    train_seconds: float = 10.0
    train_max_steps: int = 20
    train_warmup: int = 2
    decode_images: int = 2000
    device: str = "auto"
    markdown: Path | None = Path("BENCHMARKS.md")
    peers: bool = True  # time WebDataset, LitData and FFCV too (affpipe.bench.peers)
    pretrain: bool = True  # time a pre-training step fed two views a frame (affpipe.bench.pretrain)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("videos", "frames", "batch_size", "train_batch_size", "image_size", "repeats", "max_batches", "train_max_steps", "decode_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seconds <= 0 or self.train_seconds <= 0:
            raise ValueError("seconds and train_seconds must be > 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if cuda_available() else "cpu"
        return self.device


# ---- cases -----------------------------------------------------------------------------------


def _error(exc: Exception) -> str:
    log.exception("benchmark case failed")
    return f"error: {type(exc).__name__}: {exc}"


def bench_loaders(cfg: BenchConfig, data: dict, device: str) -> list[dict]:
    """Frames/s of every loader case (median over repeats) and the ratio to the research's."""
    rows = []
    for case in LOADER_CASES:
        row = {"name": case.name, "label": case.label, "status": "ok", "fps": None}
        if case.needs_cuda and device != "cuda":
            row["status"] = NEEDS_GPU
        elif case.needs_dali and not dali_available():
            row["status"] = NEEDS_DALI
        elif case.peer and not cfg.peers:
            row["status"] = NOT_RUN
        if row["status"] != "ok":
            rows.append(row)
            continue
        log.info("loader %s", case.name)
        loader = None
        try:
            loader = build_loader(case.name, index=Path(data["index"]), shards=Path(data["shards"]), batch_size=cfg.batch_size,
                                  device=device, image_size=cfg.image_size, seed=cfg.seed, work=_peer_work(cfg))
            m = measure(loader_step(loader, device), warmup=cfg.warmup, max_steps=cfg.max_batches, seconds=cfg.seconds, repeats=cfg.repeats, device=device)
            row.update(m.to_dict())
        except PeerMissing as exc:  # an optional extra: the row says so
            row["status"] = str(exc)
        except Exception as exc:  # one broken backend must not hide the others' figures
            row["status"] = _error(exc)
        finally:
            if loader is not None:
                close_loader(loader)
        rows.append(row)
    ref = next((r["fps"] for r in rows if r["name"] == "research"), None)
    for r in rows:
        r["ratio_vs_research"] = round(r["fps"] / ref, 2) if r["fps"] and ref else None
    return rows


def _peer_work(cfg: BenchConfig) -> Path:
    return Path(cfg.out) / "cache" / "peers"


def prepare_peers(cfg: BenchConfig, data: dict) -> dict[str, dict]:
    """The peers' own formats (LitData chunks, an FFCV .beton), converted once per benchmark
    data, each in a child process and timed there; a peer that is not installed says so."""
    if not cfg.peers:
        return {}
    work = _peer_work(cfg)
    if not data.get("reused"):
        shutil.rmtree(work, ignore_errors=True)  # new frames: convert again
    work.mkdir(parents=True, exist_ok=True)
    pdata = PeerData(shards=Path(data["shards"]), index=Path(data["index"]), work=work)
    out: dict[str, dict] = {}
    for name, (_, prepare) in PEERS.items():
        if prepare is None:
            continue
        log.info("converting the frames for %s", name)
        try:
            out[name] = {"status": "ok", **prepare_isolated(name, pdata, workers=usable_cores())}
        except PeerMissing as exc:
            out[name] = {"status": str(exc)}
        except Exception as exc:
            out[name] = {"status": _error(exc)}
    return out


def bench_decode(cfg: BenchConfig, data: dict) -> dict:
    """The raw decode ceiling: cv2 (libjpeg-turbo) on one thread, over the shards' JPEG bytes."""
    row: dict = {"name": "decode-ceiling", "label": "raw decode ceiling: cv2/libjpeg-turbo, 1 thread", "status": "ok", "fps": None}
    try:
        jpegs = read_jpegs(Path(data["shards"]), cfg.decode_images)
        chunk = min(256, len(jpegs))
        m = measure(decode_ceiling_step(jpegs, chunk), warmup=1, max_steps=max(1, cfg.decode_images // chunk), seconds=min(cfg.seconds, 3.0), repeats=cfg.repeats)
        row.update(m.to_dict(), images=len(jpegs), threads=1)
    except Exception as exc:
        row["status"] = _error(exc)
    return row


def decode_limit(decode: dict, cores: int) -> dict:
    """The most a CPU loader that decodes every frame can deliver here: the one-thread decode
    ceiling times the usable cores (decoding scales linearly; nothing else is free)."""
    fps = decode["fps"] * cores if decode.get("status") == "ok" and decode.get("fps") else None
    return {"name": "decode-limit", "label": f"decode limit: the 1-thread ceiling × {cores} usable cores",
            "status": "ok" if fps else decode.get("status", "—"), "fps": fps, "cores": cores}


def bench_train(cfg: BenchConfig, data: dict, device: str, loader_rows: list[dict]) -> list[dict]:
    """Training-step frames/s on synthetic tensors (compute ceiling) and fed by each loader."""
    from affpipe.index.build import load_index

    table, _ = load_index(Path(data["index"]))
    rows = []
    try:
        trainer = TrainStep(table, device=device, seed=cfg.seed)
    except Exception as exc:
        return [{"name": "synthetic", "status": _error(exc), "fps": None}]
    bench = dict(warmup=cfg.train_warmup, max_steps=cfg.train_max_steps, seconds=cfg.train_seconds, repeats=cfg.repeats, device=device)
    log.info("train step on synthetic tensors (%s)", device)
    row = {"name": "synthetic", "label": f"synthetic tensors on {device} (compute ceiling)", "status": "ok", "fps": None}
    try:
        m = measure(trainer.synthetic_step(cfg.train_batch_size, cfg.image_size), **bench)
        row.update(m.to_dict(), data_wait_share=0.0)
    except Exception as exc:
        row["status"] = _error(exc)
    rows.append(row)
    train_step = {c.name: c.train_step for c in LOADER_CASES}
    for lrow in loader_rows:
        if not train_step.get(lrow["name"], True):
            continue
        row = {"name": lrow["name"], "label": lrow["label"], "status": lrow["status"], "fps": None}
        if lrow["status"] != "ok":
            rows.append(row)
            continue
        log.info("train step fed by %s", lrow["name"])
        loader = None
        try:
            loader = build_loader(lrow["name"], index=Path(data["index"]), shards=Path(data["shards"]), batch_size=cfg.train_batch_size, device=device, image_size=cfg.image_size, seed=cfg.seed)
            m = measure(trainer.fed_step(loader), **bench)
            row.update(m.to_dict(), data_wait_share=round(m.wait_share, 4))
        except Exception as exc:
            row["status"] = _error(exc)
        finally:
            if loader is not None:
                close_loader(loader)
        rows.append(row)
    ceiling = rows[0]["fps"]
    for r in rows:
        r["ratio_vs_compute_ceiling"] = round(r["fps"] / ceiling, 3) if r["fps"] and ceiling else None
    return rows


def _bench_crop(out: Path) -> dict:
    """``crop`` against the naive loop (affpipe.bench.crop); a row saying why when it cannot run."""
    try:
        return bench_crop(out / "crop")
    except Exception as exc:  # a missing facenet-pytorch or scikit-image: the other rows still count
        return {"error": _error(exc)}


def bench_pretrain_case(cfg: BenchConfig, data: dict, device: str) -> dict:
    """The pre-training case (``affpipe.bench.pretrain``), or its error."""
    from affpipe.bench.pretrain import bench_pretrain

    log.info("pre-training step fed two views a frame (%s)", device)
    try:
        return {"status": "ok", **bench_pretrain(Path(data["shards"]), device=device, batch_size=cfg.train_batch_size,
                                                  image_size=cfg.image_size, seed=cfg.seed, warmup=cfg.train_warmup,
                                                  max_steps=cfg.train_max_steps, seconds=cfg.train_seconds,
                                                  repeats=cfg.repeats)}
    except Exception as exc:
        return {"name": "pretrain-simsiam", "status": _error(exc)}


# ---- the command -----------------------------------------------------------------------------


def run_bench(cfg: BenchConfig) -> dict:
    """Run every case, write ``results.json``, ``loaders.png`` and the BENCHMARKS.md table."""
    from affpipe.bench.report import bench_markdown, loaders_chart

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = cfg.resolved_device()
    if device == "cuda" and not cuda_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    t_start = time.perf_counter()
    machine = machine_info()
    data = prepare_data(out / "cache", videos=cfg.videos, frames=cfg.frames, seed=cfg.seed, workers=usable_cores(),
                        samples_per_shard=SAMPLES_PER_SHARD)
    conversions = prepare_peers(cfg, data)
    loaders = bench_loaders(cfg, data, device)
    decode = bench_decode(cfg, data)
    train = bench_train(cfg, data, device, loaders)
    crop = _bench_crop(out)
    pretrain = bench_pretrain_case(cfg, data, device) if cfg.pretrain else None
    ref = next((r["fps"] for r in loaders if r["name"] == "research"), None)
    decode["ratio_vs_research"] = round(decode["fps"] / ref, 2) if decode["fps"] and ref else None
    limit = decode_limit(decode, usable_cores())
    for r in [*loaders, decode]:
        r["ratio_vs_limit"] = round(r["fps"] / limit["fps"], 3) if r.get("fps") and limit.get("fps") else None
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "kind": "bench",
        "machine": machine,
        "device": device,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "data": {k: v for k, v in data.items() if k != "params"} | {"params": data["params"]},
        "loaders": loaders,
        "decode_ceiling": decode,
        "decode_limit": limit,
        "peer_conversions": conversions,
        "train": train,
        "pretrain": pretrain,
        "target": {
            "ratio": TARGET_RATIO,
            "fps": round(TARGET_RATIO * ref, 1) if ref else None,
            "met_by": [r["name"] for r in loaders if r["ratio_vs_research"] and r["ratio_vs_research"] >= TARGET_RATIO],
            "min_ratio": MIN_RATIO,
            "min_fps": round(MIN_RATIO * ref, 1) if ref else None,
            "min_met_by": [r["name"] for r in loaders if r["ratio_vs_research"] and r["ratio_vs_research"] >= MIN_RATIO],
        },
        "torch_threads": torch.get_num_threads(),
        "crop": crop,
    }
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    loaders_chart(results, out / "loaders.png")
    if cfg.markdown is not None:
        md = Path(cfg.markdown)
        # the chart goes beside the markdown (docs/, committed) so its link works in the repository
        chart = md.resolve().parent / "docs" / "benchmark-loaders.png"
        chart.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "loaders.png", chart)
        update_marked(md, "bench", bench_markdown(results, out.resolve(), md.resolve().parent, chart=chart), title="Loaders and the training step (`make benchmark`)")
        update_marked(md, "crop", crop_markdown(crop, machine), title=CROP_TITLE)
        if pretrain is not None and pretrain.get("status", "ok") == "ok":
            from affpipe.bench.pretrain import pretrain_markdown

            update_marked(md, "pretrain", pretrain_markdown(pretrain, machine),
                          title="Pre-training: data wait of a two-view step (`make benchmark`)")
    log.info("benchmark done in %.0f s: %s", results["wall_s"], out / "results.json")
    return results
