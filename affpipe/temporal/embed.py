"""``affpipe embed``: a frozen backbone over every frame of some splits → the feature table.

SOURCE is a per-frame run folder or checkpoint (its backbone, image size), ``imagenet`` (the
published weights of ``--backbone``, torchvision's or ``timm/NAME``'s, from the local cache, with
the same offline error as ``--init imagenet``), or ``--weights FILE`` (a ``.safetensors`` or
state-dict file for ``--backbone``). The backbone's own input op resizes and normalizes on the
device (a ViT at 224 px from 112 px frames). Frames stream through the ordinary loaders, unaugmented and in shard order.

Resumable per shard: each shard's features go to ``FEATS/parts/<split>-<n>.arrow`` (written
atomically) as soon as its last sample has passed; a rerun skips the shards whose part exists
and streams the others through one loader. When every part is there they are merged into
``features.arrow`` sorted by (video, frame) and ``manifest.json`` is written.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from affpipe.io import sha256_file
from affpipe.loaders.base import LoaderConfig
from affpipe.temporal.features import (
    FEATURE_SCHEMA_VERSION,
    PARTS_DIR,
    TABLE_FILE,
    merge_parts,
    write_manifest,
    write_part,
)

log = logging.getLogger(__name__)

SPLIT_CHOICES = ("all", "train", "val", "test")


@dataclass(frozen=True)
class EmbedConfig:
    """Options of ``affpipe embed``. ``backbone``/``image_size`` default to the checkpoint's
    (resnet18 / 112 for ``imagenet``)."""

    source: str
    shards: Path
    out: Path
    split: str = "all"
    backbone: str | None = None
    image_size: int | None = None
    weights: Path | None = None  # a weight file for `backbone` (then SOURCE is "weights")
    batch_size: int = 256
    device: str = "auto"
    amp: str = "bf16"  # GPU only
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def __post_init__(self) -> None:
        if self.split not in SPLIT_CHOICES:
            raise ValueError(f"split must be one of {SPLIT_CHOICES}, got {self.split!r}")
        if self.batch_size < 1 or (self.image_size is not None and self.image_size < 1):
            raise ValueError("batch_size and image_size must be >= 1")
        if self.loader.on_bad != "error":
            raise ValueError("embed: on_bad must be 'error' (a skipped sample would shift the per-shard parts)")


@dataclass
class Encoder:
    """The frozen backbone and what the manifest says about it."""

    backbone: torch.nn.Module
    arch: str
    image_size: int
    source: str
    checkpoint: Path
    sha256: str
    input: dict[str, Any] = field(default_factory=dict)  # what the backbone's input op does


def load_encoder(cfg: EmbedConfig, device: torch.device) -> Encoder:
    """The backbone SOURCE names, in eval mode on ``device``."""
    from affpipe.temporal.heads import restore_model
    from affpipe.train.checkpoint import load_checkpoint, resolve_checkpoint
    from affpipe.train.config import from_dict
    from affpipe.train.models import ModelConfig, build_model, resolve_input

    if cfg.weights is not None or cfg.source in ("imagenet", "pretrained"):
        arch = cfg.backbone or "resnet18"
        init = str(cfg.weights) if cfg.weights is not None else "imagenet"
        mcfg = resolve_input(ModelConfig(arch=arch, tasks=("va",), init=init), cfg.image_size or 112)
        model = build_model(mcfg)  # the offline error and the weight-file checks live there
        ckpt = Path(model.init_report["file"])
        size = cfg.image_size or 112
    else:
        ckpt = resolve_checkpoint(Path(cfg.source))
        state = load_checkpoint(ckpt, map_location="cpu")
        run_cfg = from_dict(state["config"], source=f"{ckpt} (config)")
        if run_cfg.is_temporal:
            raise ValueError(f"{ckpt}: a temporal run has no frame encoder; embed the per-frame run its features came from")
        model = restore_model(run_cfg, state, source=str(ckpt))
        arch = run_cfg.model.arch
        if cfg.backbone is not None and cfg.backbone != arch:
            raise ValueError(f"--backbone {cfg.backbone}: {ckpt} holds a {arch} backbone")
        size = cfg.image_size or run_cfg.image_size
    # The model's input op first: it resizes and normalizes the loader's uint8 frames as the backbone expects.
    backbone = torch.nn.Sequential(model.input, model.backbone).to(device).eval()
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    source = str(cfg.weights) if cfg.weights is not None else cfg.source
    norm = model.input
    spec = {"size": norm.size or size, "mean": norm.mean255.flatten().div(255).tolist(),
            "std": norm.inv255.flatten().reciprocal().div(255).tolist(), "interpolation": norm.interpolation}
    return Encoder(backbone, arch, size, source, ckpt.resolve(), sha256_file(ckpt) if ckpt.is_file() else "", spec)


def _splits(cfg: EmbedConfig, manifest: dict) -> list[str]:
    have = list(manifest["splits"])
    if cfg.split == "all":
        return have
    if cfg.split not in have:
        raise ValueError(f"{cfg.shards}: no split {cfg.split!r} in the shards (has {have})")
    return [cfg.split]


def _view(parts: Path, split: str, todo: list[tuple[int, Path, Path]]) -> Path:
    """A folder of links to the shards still to embed, laid out as ``<view>/<split>/*.tar`` so
    the ordinary loaders read exactly them, in manifest order (names sort like the indices)."""
    view = parts / f".view-{split}"
    shutil.rmtree(view, ignore_errors=True)
    (view / split).mkdir(parents=True)
    for k, tar, idx in todo:
        (view / split / f"{k:06d}.tar").symlink_to(tar.resolve())
        (view / split / f"{k:06d}.idx").symlink_to(idx.resolve())
    return view


class _Stats:
    def __init__(self) -> None:
        self.frames, self.wait, self.time = 0, 0.0, 0.0


def _embed_split(cfg: EmbedConfig, enc: Encoder, split: str, parts: Path, device: torch.device, stats: _Stats) -> None:
    from affpipe.dist import autocast
    from affpipe.loaders import make_loader
    from affpipe.loaders.base import find_shards
    from affpipe.shards.format import read_idx_header

    shards = find_shards(cfg.shards, split)
    todo = [(k, tar, idx) for k, (tar, idx) in enumerate(shards) if not (parts / f"{split}-{k:06d}.arrow").is_file()]
    if not todo:
        log.info("embed: %s: all %d shards already embedded", split, len(shards))
        return
    counts = [read_idx_header(idx)[1] for _, _, idx in todo]
    view = _view(parts, split, todo)
    loader = make_loader(view, split, batch_size=cfg.batch_size, train=False, device=device,
                         image_size=enc.image_size, rank=0, world_size=1, normalize=False, **cfg.loader.kwargs(train=False))
    amp = cfg.amp if device.type == "cuda" else "none"
    feats: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    pending, current = 0, 0
    bar = tqdm(total=sum(counts), desc=f"embed {split}", unit="frame", dynamic_ncols=True, mininterval=1.0)
    t0 = t_wait = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            stats.wait += time.perf_counter() - t_wait
            images = batch.images
            with autocast(device, amp):
                out = enc.backbone(images)
            feats.append(out.float().cpu().numpy().astype(np.float16))
            ids.append(batch.row_id.cpu().numpy())
            pending += len(batch)
            bar.update(len(batch))
            while current < len(todo) and pending >= counts[current]:  # a shard is complete: its part
                f, r = np.concatenate(feats), np.concatenate(ids)
                n = counts[current]
                write_part(parts / f"{split}-{todo[current][0]:06d}.arrow", r[:n], f[:n])
                feats, ids, pending, current = [f[n:]], [r[n:]], pending - n, current + 1
            t_wait = time.perf_counter()
    bar.close()
    stats.frames += sum(counts)
    stats.time += time.perf_counter() - t0
    shutil.rmtree(view, ignore_errors=True)
    if current < len(todo):
        raise ValueError(f"embed: {split}: the loader yielded fewer samples than the shards' indexes list")


def embed(cfg: EmbedConfig) -> dict[str, Any]:
    """Write ``cfg.out/features.arrow`` + ``manifest.json``; returns the manifest."""
    from affpipe.dist import pick_device
    from affpipe.shards.format import manifest_index, read_manifest

    out = Path(cfg.out)
    if (out / TABLE_FILE).exists():
        raise FileExistsError(f"{out} already holds a feature table; choose another -o or delete it")
    shard_manifest = read_manifest(cfg.shards)
    splits = _splits(cfg, shard_manifest)
    device = pick_device(cfg.device)
    enc = load_encoder(cfg, device)
    parts = out / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    stats = _Stats()
    for split in splits:
        _embed_split(cfg, enc, split, parts, device, stats)
    index = manifest_index(cfg.shards, shard_manifest).resolve()
    table = shard_manifest.get("table", "frames")
    lookup = _lookup(index, table)
    files = sorted(p for s in splits for p in parts.glob(f"{s}-*.arrow"))
    rows = merge_parts(files, out, lookup)
    manifest = {
        "schema_version": FEATURE_SCHEMA_VERSION, "source": cfg.source, "source_checkpoint": str(enc.checkpoint),
        "source_sha256": enc.sha256, "backbone": enc.arch, "image_size": enc.image_size, "input": enc.input,
        "feature_dim": _width(enc, device), "dtype": "float16", "index": str(index),
        "table": table, "shards": str(Path(cfg.shards).resolve()), "splits": splits, "rows": rows,
        "throughput": {"frames": stats.frames, "seconds": stats.time, "device": str(device),
                       "frames_per_s": stats.frames / stats.time if stats.time else None,
                       "data_wait_share": stats.wait / stats.time if stats.time else None},
    }
    write_manifest(out, manifest)
    shutil.rmtree(parts)
    log.info("embed: %d rows x %d features → %s", rows, manifest["feature_dim"], out / TABLE_FILE)
    return manifest


def _width(enc: Encoder, device: torch.device) -> int:
    with torch.inference_mode():
        x = torch.zeros(1, 3, enc.image_size, enc.image_size, dtype=torch.uint8, device=device)
        return int(enc.backbone.eval()(x).shape[1])


def _lookup(index: Path, table_name: str):
    """``row_id → (video, frame, split)`` over the label table (an error for an unknown id)."""
    from affpipe.index.build import load_index

    table, _ = load_index(index, table=table_name)
    rid = table.column("row_id").to_numpy()
    order = np.argsort(rid)
    video = table.column("video").to_numpy(zero_copy_only=False)
    frame = table.column("frame").to_numpy()
    split = table.column("split").to_numpy(zero_copy_only=False)

    def lookup(row_id: np.ndarray):
        pos = np.clip(np.searchsorted(rid[order], row_id), 0, len(rid) - 1)
        bad = rid[order][pos] != row_id
        if bad.any():
            raise ValueError(f"{index}: row_id {int(row_id[bad][0])} of the shards is not in the label table")
        take = order[pos]
        return video[take], frame[take], split[take]

    return lookup
