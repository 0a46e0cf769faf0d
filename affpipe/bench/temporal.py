"""Temporal-head training at full scale on a CPU: one epoch over a feature table of Aff-Wild2's size.

``make_random_table`` writes a label index and a feature table of random vectors with the
full-scale twin's shape (560 videos with heavy-tailed lengths, ~2.9M frames, 2% without a crop,
512 float16 features); ``bench_epoch`` trains one epoch of a temporal head on it with the real
trainer (``train_temporal``) and reports the epoch's time, frames/s, data-wait share and the
process's memory (private and file-backed: the features are memory-mapped, not loaded).

    python -m affpipe.bench.temporal --out /tmp/tbench [--rows 2900000] [--arch tcn] [--max-steps N]
    python -m affpipe.bench.temporal --out /tmp/tbench --embed-source RUN --shards SHARDS

The second form times ``affpipe embed`` beside the backbone's bare forward pass (``bench_embed``);
``--backbones a,b --shards SHARDS`` does it for each backbone (``bench_backbones``).
``--open-only`` times the checks a feature table gets when it is opened (``bench_open``).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from affpipe.labels import AU_NAMES, FRAMES_SCHEMA, TABLE_SCHEMA_VERSION

log = logging.getLogger(__name__)

FULL_ROWS, FULL_VIDEOS, DIM = 2_900_000, 560, 512


def _lengths(rows: int, videos: int, rng: np.random.Generator) -> np.ndarray:
    raw = np.minimum(rng.lognormal(0.0, 1.0, videos), 9.0)  # the twin's heavy tail (longest ~47k frames)
    lens = np.maximum(np.floor(raw / raw.sum() * rows), 10).astype(np.int64)
    lens[np.argmax(lens)] += rows - lens.sum()
    return lens


def _label_table(lens: np.ndarray, rng: np.random.Generator) -> pa.Table:
    n = int(lens.sum())
    video = np.repeat(np.array([f"video{i:04d}" for i in range(len(lens))], object), lens)
    split = np.repeat(np.where(rng.random(len(lens)) < 0.2, "val", "train").astype(object), lens)
    au = (rng.random((n, len(AU_NAMES))) < 0.25).astype(np.int8)
    cols = {
        "row_id": np.arange(n, dtype=np.int64), "video": video,
        "frame": np.concatenate([np.arange(1, k + 1) for k in lens]).astype(np.int32), "split": split,
        "image": np.full(n, None, object), "image_root": np.zeros(n, np.int16), "has_image": rng.random(n) > 0.02,
        "valence": rng.uniform(-1, 1, n).astype(np.float32), "arousal": rng.uniform(-1, 1, n).astype(np.float32),
        "va_valid": np.ones(n, bool), "expr": rng.integers(0, 8, n).astype(np.int8), "expr_valid": rng.random(n) < 0.4,
        **{name: au[:, k] for k, name in enumerate(AU_NAMES)}, "au_valid": rng.random(n) < 0.6,
    }
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in FRAMES_SCHEMA}, schema=FRAMES_SCHEMA)


def make_random_table(out: Path, *, rows: int = FULL_ROWS, videos: int = FULL_VIDEOS, dim: int = DIM,
                      seed: int = 0) -> Path:
    """``out/index`` (label table) and ``out/feats`` (random float16 features of the rows with a
    crop), unless already there; returns the feature folder."""
    from affpipe.io import atomic_write_text, write_parquet
    from affpipe.lineage import table_fingerprint
    from affpipe.temporal.features import (
        FEATURE_SCHEMA_VERSION,
        TABLE_FILE,
        features_fingerprint,
        write_manifest,
        write_table,
    )

    out = Path(out)
    feats = out / "feats"
    if (feats / TABLE_FILE).is_file():
        return feats
    rng = np.random.default_rng(seed)
    table = _label_table(_lengths(rows, videos, rng), rng)
    (out / "index").mkdir(parents=True, exist_ok=True)
    write_parquet(table, out / "index" / "frames.parquet")
    index_fp = table_fingerprint(table)
    atomic_write_text(out / "index" / "index.json", json.dumps({"schema_version": TABLE_SCHEMA_VERSION,
                                                                "fingerprint": {"frames": index_fp}}) + "\n")
    keep = table.column("has_image").to_numpy(zero_copy_only=False)
    n = int(keep.sum())
    feats.mkdir(parents=True, exist_ok=True)
    scratch = np.lib.format.open_memmap(out / "scratch.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    for s in range(0, n, 1 << 18):  # chunks: memory stays flat
        scratch[s:s + (1 << 18)] = rng.standard_normal((min(1 << 18, n - s), dim), dtype=np.float32)
    col = lambda name: table.column(name).to_numpy(zero_copy_only=False)[keep]  # noqa: E731
    write_table(feats / TABLE_FILE, row_id=col("row_id"), video=col("video"), frame=col("frame"), split=col("split"),
                features=scratch)
    del scratch
    (out / "scratch.npy").unlink()
    manifest = {"schema_version": FEATURE_SCHEMA_VERSION, "source": "random", "backbone": "random",
                "feature_dim": dim, "index": "../index", "index_fingerprint": index_fp, "table": "frames", "rows": n}
    write_manifest(feats, {**manifest, "fingerprint": features_fingerprint(manifest)})
    return feats


class _MemoryPeak:
    """Peak private (RssAnon) and file-backed (RssFile) memory of this process, sampled."""

    def __init__(self, every: float = 0.5) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self._sample()

    def __enter__(self) -> _MemoryPeak:
        if Path("/proc/self/status").is_file():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self._sample()


def cpu_probe_gflops(seconds: float = 2.0) -> float:
    """GFLOP/s of a float32 ``[2048,512] @ [512,512]`` matmul on this process's threads, right now:
    says how much of the CPU the benchmark got (the machine may be shared)."""
    import torch

    a, b = torch.randn(2048, 512), torch.randn(512, 512)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 2048 * 512 * 512 * n / (time.perf_counter() - t0) / 1e9


def bench_epoch(feats: Path, out: Path, *, arch: str = "tcn", window: int = 64, stride: int = 32,
                batch_size: int = 32, hidden: int = 128, layers: int = 4, max_steps: int | None = None,
                max_val_steps: int | None = None) -> dict[str, Any]:
    """One epoch of ``train_temporal`` on ``feats`` (with its validation pass); the figures.

    With ``max_steps`` only that many steps are trained (and ``max_val_steps`` validated); the
    full epoch's time is then extrapolated from the measured seconds per step, and says so.
    """
    import torch

    from affpipe.run.config import TrainConfig
    from affpipe.run.folder import RunFolder
    from affpipe.runs.train import train as train_temporal
    from affpipe.temporal.data import TemporalData

    cfg = TrainConfig.of(task="mtl", features=str(feats), out=str(out), epochs=1, batch_size=batch_size, lr=1e-3,
                         device="cpu", log_every=10, max_steps_per_epoch=max_steps, max_val_steps=max_val_steps,
                         temporal=dict(arch=arch, window=window, stride=stride, hidden=hidden, layers=layers))
    data = TemporalData.open(cfg.data.features)
    full_steps = len(data.loader("train", cfg, train=True, device=torch.device("cpu")))
    del data
    probe = [cpu_probe_gflops()]
    t0 = time.perf_counter()
    with _MemoryPeak() as mem:
        run = train_temporal(cfg)
    total = time.perf_counter() - t0
    probe.append(cpu_probe_gflops())
    epoch = [r for r in RunFolder(run).read_metrics() if r.get("kind") == "epoch"][-1]
    train_s = epoch["wall_time"] - epoch.get("val_time_s", 0.0)
    steps = epoch["step"]
    return {"steps_measured": steps, "steps_per_epoch": full_steps,
            "epoch_train_s_extrapolated": train_s / steps * full_steps if steps < full_steps else None,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else None,
            "cpu_probe_gflops_before_after": probe, "torch_threads": torch.get_num_threads(),
            "arch": arch, "window": window, "stride": stride, "batch_windows": batch_size, "hidden": hidden,
            "layers": layers, "train_frames_per_s": epoch.get("frames_per_s"),
            "data_wait_share": epoch.get("data_wait_share"), "epoch_train_s": train_s,
            "val_s": epoch.get("val_time_s"), "total_s": total, "peak_rss_anon_gib": mem.peak["RssAnon"] / 2**30,
            "peak_rss_file_gib": mem.peak["RssFile"] / 2**30}


def bench_open(feats: Path, repeats: int = 2) -> dict[str, Any]:
    """Seconds of each check ``open_features`` makes (over the mapped table; the best of
    ``repeats``, the page cache warm after the first) and the whole open, with peak memory."""
    from affpipe.index.build import fingerprint_of, load_index
    from affpipe.temporal.features import (
        check_rows,
        check_table,
        manifest_index_path,
        nonfinite_rows,
        open_features,
        read_table,
    )

    feats = Path(feats)
    stages: dict[str, list[float]] = {}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        stages.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    with _MemoryPeak() as mem:
        for _ in range(repeats):
            t = timed("map + columns + sorted check", lambda: read_table(feats))
            index = manifest_index_path(feats, t.manifest)
            timed("finiteness scan", lambda t=t: nonfinite_rows(t.features))
            timed("width + rows + finiteness (check_table)", lambda t=t: check_table(t))
            labels, meta = timed("label table read", lambda index=index: load_index(index))
            timed("index fingerprint", lambda labels=labels, meta=meta: fingerprint_of(labels, meta))
            timed("row ids vs (video, frame)", lambda t=t, labels=labels, index=index: check_rows(t, labels, index))
            timed("open_features total", lambda: open_features(feats))
            del t, labels, meta
    t = read_table(feats)
    return {"rows": len(t), "dim": t.dim, "table_gib": (feats / "features.arrow").stat().st_size / 2**30,
            "seconds_best": {k: min(v) for k, v in stages.items()}, "seconds_first": {k: v[0] for k, v in stages.items()},
            "peak_rss_anon_gib": mem.peak["RssAnon"] / 2**30, "peak_rss_file_gib": mem.peak["RssFile"] / 2**30,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else None}


def bench_embed(source: str, shards: Path, out: Path, *, batch_size: int = 256, device: str = "cpu",
                forward_seconds: float = 20.0, loader: Any = None, image_size: int | None = None,
                backbone: str | None = None, weights: Path | None = None, split: str = "all") -> dict[str, Any]:
    """``affpipe embed`` frames/s and data-wait share beside the same backbone's forward pass on
    ready uint8 batches (no loader), measured in one run: the loader's cost is the difference."""
    import torch

    from affpipe.dist import pick_device
    from affpipe.runs.embed import EmbedConfig, embed, load_encoder

    extra = {"loader": loader} if loader is not None else {}
    cfg = EmbedConfig(source=source, shards=Path(shards), out=Path(out), batch_size=batch_size, device=device,
                      image_size=image_size, backbone=backbone, weights=weights, split=split,
                      overwrite=True, **extra)  # a fresh pass each time: deletes only embed's own files
    dev = pick_device(device)
    enc = load_encoder(cfg, dev)
    images = torch.randint(0, 256, (batch_size, 3, enc.image_size, enc.image_size), dtype=torch.uint8, device=dev)
    with torch.inference_mode():
        enc.backbone(images)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < forward_seconds:
            enc.backbone(images)
            n += batch_size
    forward_fps = n / (time.perf_counter() - t0)
    tp = embed(cfg)["throughput"]
    return {"backbone": enc.arch, "image_size": enc.image_size, "batch_size": batch_size, "device": str(dev),
            "forward_only_frames_per_s": forward_fps, "embed_frames_per_s": tp["frames_per_s"],
            "embed_vs_forward": tp["frames_per_s"] / forward_fps, "data_wait_share": tp["data_wait_share"],
            "frames": tp["frames"], "backbone_input_size": enc.input.get("size"),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


def bench_backbones(shards: Path, out: Path, backbones: list[str], *, image_size: int = 112, batch_size: int = 64,
                    forward_seconds: float = 10.0, loader: Any = None, split: str = "val") -> dict[str, Any]:
    """``bench_embed`` for each of ``backbones`` (random weights: speed does not depend on them),
    each through a weight file (``--weights``), as a user would embed a face-pretrained one; then
    all of them in one ``embed`` pass (each frame decoded once) against the sum of the passes."""
    from safetensors.torch import save_file

    from affpipe.models.model import ModelConfig, backbone_state_dict, build_model
    from affpipe.runs.embed import EmbedConfig, embed

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, files = [], []
    for arch in backbones:
        slug = arch.replace("/", "_")
        weights = out / f"{slug}.safetensors"
        save_file({k: v.contiguous() for k, v in backbone_state_dict(build_model(ModelConfig(arch=arch, tasks=("va",)))).items()},
                  str(weights))
        files.append(weights)
        rows.append(bench_embed("weights", shards, out / slug, batch_size=batch_size, forward_seconds=forward_seconds,
                                loader=loader, image_size=image_size, backbone=arch, weights=weights, split=split))
        log.info("bench_backbones: %s", rows[-1])
    extra = {"loader": loader} if loader is not None else {}
    joint = embed(EmbedConfig(source="weights", shards=Path(shards), out=out / "joint", split=split, device="cpu",
                              backbone=tuple(backbones), weights=tuple(files), image_size=image_size,
                              batch_size=batch_size, overwrite=True,  # a fresh pass: deletes only embed's files
                              **extra))["tables"][0]["throughput"]
    separate_s = sum(r["frames"] / r["embed_frames_per_s"] for r in rows)
    return {"backbones": rows, "joint_frames_per_s": joint["frames_per_s"], "joint_seconds": joint["seconds"],
            "separate_seconds": separate_s, "joint_data_wait_share": joint["data_wait_share"],
            "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


def main() -> None:
    """Command line of this benchmark (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", type=int, default=FULL_ROWS)
    p.add_argument("--videos", type=int, default=FULL_VIDEOS)
    p.add_argument("--arch", choices=("tcn", "transformer"), default="tcn")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--stride", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=None, help="Train only this many steps and extrapolate.")
    p.add_argument("--max-val-steps", type=int, default=None)
    p.add_argument("--embed-source", default=None, help="Instead: time `affpipe embed` of this run/checkpoint ...")
    p.add_argument("--shards", type=Path, default=None, help="... over these shards.")
    p.add_argument("--image-size", type=int, default=None, help="With --embed-source (default: the run's).")
    p.add_argument("--backbones", default=None, help="Instead: embed frames/s of these backbones (comma-separated, "
                   "random weights through a weight file) over --shards, at --image-size (112).")
    p.add_argument("--open-only", action="store_true", help="Instead: time the checks of opening the table.")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.backbones:
        if args.shards is None:
            p.error("--backbones needs --shards")
        print(json.dumps(bench_backbones(args.shards, args.out, args.backbones.split(","),
                                         image_size=args.image_size or 112), indent=2))
        return
    if args.embed_source:
        if args.shards is None:
            p.error("--embed-source needs --shards")
        print(json.dumps(bench_embed(args.embed_source, args.shards, args.out / "feats", image_size=args.image_size),
                         indent=2))
        return
    t0 = time.perf_counter()
    feats = make_random_table(args.out / "data", rows=args.rows, videos=args.videos)
    made = time.perf_counter() - t0
    if args.open_only:
        print(json.dumps(bench_open(feats), indent=2))
        return
    import shutil

    run = args.out / f"run-{args.arch}"
    shutil.rmtree(run, ignore_errors=True)
    result = bench_epoch(feats, run, arch=args.arch, window=args.window, stride=args.stride, batch_size=args.batch_size,
                         max_steps=args.max_steps, max_val_steps=args.max_val_steps)
    result.update(rows=args.rows, table_s=made)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
