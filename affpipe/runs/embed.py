"""``affpipe embed``: a frozen backbone over every frame of some splits → the feature table.

SOURCE is a per-frame run folder or checkpoint (its backbone, image size), ``imagenet`` (the
published weights of ``--backbone``, torchvision's or ``timm/NAME``'s, from the local cache, with
the same offline error as ``--init imagenet``), or ``--weights FILE`` (a ``.safetensors`` or
state-dict file for ``--backbone``). The backbone's own input op resizes and normalizes on the
device (a ViT at 224 px from 112 px frames). Frames stream through the ordinary loaders,
unaugmented and in shard order.

Several backbones (``--backbone`` repeated, with ``imagenet`` or one ``--weights`` each) are
embedded in one pass over the frames: every JPEG is decoded once and goes through each backbone,
and each backbone gets its own table, ``OUT/<name>/`` (``name``: the weight file's stem, else the
backbone's name with ``/`` as ``_``). Separate tables rather than one concatenated table: each
stays a table of its own (lineage, width, resumable parts) and any of them can be fused with any
other of the same index later (``affpipe train --features A --features B``).

(A little over 400 lines: the one-pass loop, its chunker and the folder claims share the
per-shard part layout that makes a resumed table byte-identical; split up they would each need it.)

The folder is claimed (``affpipe.outdir``): a folder holding anything else is refused, nothing
is written through a link, and a folder started from other inputs (another SOURCE, shards,
backbone, image size, batch size) is refused naming both, or emptied of our files with
``--overwrite``: a table never mixes two sources.

Resumable per shard: each shard's features go to ``FEATS/parts/<split>-<n>.arrow`` (written
atomically) as soon as its last sample has passed; a rerun skips the shards whose part exists
and streams the others through one loader. A shard's frames go through the backbone in chunks
counted from its first frame (``_Chunker``), so a resumed table has the same bytes as an
uninterrupted one. When every part is there they are merged into ``features.arrow`` sorted by
(video, frame) and ``manifest.json`` records the lineage (index and shards fingerprints, source
sha256, backbone, image size, width, rows; paths relative to the folder) and the loader used.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from affpipe.io import safe_name, sha256_file
from affpipe.loaders.base import LoaderConfig
from affpipe.outdir import Claim, Owner, claim
from affpipe.temporal.features import (
    FEATURE_SCHEMA_VERSION,
    MANIFEST_FILE,
    PARTS_DIR,
    SCRATCH_FILE,
    TABLE_FILE,
    features_fingerprint,
    merge_parts,
    nonfinite_rows,
    write_manifest,
    write_part,
)
from affpipe.temporal.features import read_manifest as read_manifest_of

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
    backbone: str | tuple[str, ...] | None = None  # several: one table each, in one pass over the frames
    image_size: int | None = None
    weights: Path | tuple[Path, ...] | None = None  # weight files for `backbone` (then SOURCE is "weights")
    batch_size: int = 256
    device: str = "auto"
    amp: str = "bf16"  # GPU only
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    overwrite: bool = False  # a folder started from other inputs: delete our files and start afresh

    def __post_init__(self) -> None:
        if self.split not in SPLIT_CHOICES:
            raise ValueError(f"split must be one of {SPLIT_CHOICES}, got {self.split!r}")
        if self.batch_size < 1 or (self.image_size is not None and self.image_size < 1):
            raise ValueError("batch_size and image_size must be >= 1")
        if self.loader.on_bad != "error":
            raise ValueError("embed: on_bad must be 'error' (a skipped sample would shift the per-shard parts)")
        for name in ("backbone", "weights"):  # one value or a list of them, kept as a tuple
            value = getattr(self, name)
            if value is not None:
                value = tuple(value) if isinstance(value, list | tuple) else (value,)
                object.__setattr__(self, name, tuple(Path(v) for v in value) if name == "weights" else value)
        n, w = len(self.backbone or ()), len(self.weights or ())
        if w and n and w != n:
            raise ValueError(f"embed: {n} --backbone and {w} --weights: give one weight file per backbone")
        if max(n, w) > 1 and self.source not in ("imagenet", "pretrained", "weights"):
            raise ValueError(f"embed: several backbones need SOURCE imagenet or --weights; {self.source} holds one")

    def encoders(self) -> list[tuple[str | None, Path | None]]:
        """``(backbone, weight file)`` of each table to write."""
        n = max(len(self.backbone or ()), len(self.weights or ()), 1)
        return [((self.backbone or (None,) * n)[k], (self.weights or (None,) * n)[k]) for k in range(n)]

    def folders(self) -> list[Path]:
        """Each table's folder: OUT itself for one, ``OUT/<name>`` for several."""
        specs = self.encoders()
        if len(specs) == 1:
            return [Path(self.out)]
        # names from weight files and flags become folders: the one safe-name check (a stem `..` would leave OUT)
        names = [safe_name(w.stem, f"--weights {w}") if w is not None
                 else safe_name(str(b or "resnet18").replace("/", "_"), f"--backbone {b}") for b, w in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"embed: two tables would share a folder under {self.out}: {names}")
        return [Path(self.out) / name for name in names]


@dataclass
class Encoder:
    """The frozen backbone and what the manifest says about it."""

    backbone: torch.nn.Module
    arch: str
    image_size: int
    source: str
    checkpoint: Path
    sha256: str
    width: int = 0  # features per frame
    input: dict[str, Any] = field(default_factory=dict)  # what the backbone's input op does
    kind: str = "run"  # "run" | "weights" | "published": only a run's checkpoint holds per-frame heads
    model_cfg: Any = None  # the resolved ModelConfig it was built from (what rebuilds it: EncoderSpec)


def load_encoder(cfg: EmbedConfig, device: torch.device, which: int = 0) -> Encoder:
    """The backbone SOURCE names (the ``which``-th of several), in eval mode on ``device``."""
    from affpipe.models.model import ModelConfig, build_model, resolve_input
    from affpipe.run.checkpoint import load_checkpoint
    from affpipe.run.config import from_dict
    from affpipe.run.folder import resolve_checkpoint
    from affpipe.runs.kinds import kind_of

    backbone, weights = cfg.encoders()[which]
    if weights is not None or cfg.source in ("imagenet", "pretrained"):
        arch = backbone or "resnet18"
        init = str(weights) if weights is not None else "imagenet"
        model_cfg = resolve_input(ModelConfig(arch=arch, tasks=("va",), init=init), cfg.image_size or 112)
        model = build_model(model_cfg)
        ckpt = Path(model.init_report["file"])  # the offline error and the weight-file checks live in build_model
        size = cfg.image_size or 112
    else:
        ckpt = resolve_checkpoint(Path(cfg.source))
        state = load_checkpoint(ckpt, map_location="cpu")
        run_cfg = from_dict(state["config"], source=f"{ckpt} (config)")
        model = kind_of(run_cfg).frame_encoder(run_cfg, state, str(ckpt))
        arch = run_cfg.model.arch
        if backbone is not None and backbone != arch:
            raise ValueError(f"--backbone {backbone}: {ckpt} holds a {arch} backbone")
        size = cfg.image_size or run_cfg.image_size
        model_cfg = resolve_input(run_cfg.model, run_cfg.image_size)
    # The model's input op first: it resizes and normalizes the loader's uint8 frames as the backbone expects.
    net = torch.nn.Sequential(model.input_norm, model.backbone).to(device).eval()
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    norm = model.input_norm
    spec = {"size": norm.size or size, "mean": norm.mean255.flatten().div(255).tolist(),
            "std": norm.inv255.flatten().reciprocal().div(255).tolist(), "interpolation": norm.interpolation}
    source = str(weights) if weights is not None else cfg.source
    kind = "weights" if weights is not None else "published" if cfg.source in ("imagenet", "pretrained") else "run"
    enc = Encoder(net, arch, size, source, ckpt.resolve(), sha256_file(ckpt) if ckpt.is_file() else "", input=spec,
                  kind=kind, model_cfg=model_cfg)
    enc.width = _width(enc, device)
    return enc


def table_encoder(folder: Path) -> tuple[torch.nn.Module, Any]:
    """The frozen encoder (input op + backbone, on the CPU) that embedded the feature table in
    ``folder``, rebuilt from its manifest, and its ``affpipe.run.crops.EncoderSpec``: what a
    temporal run needs to read face crops. Checked against the manifest: the source's sha256,
    the feature width and the input op (a changed source, or another affpipe's input op, is one
    error naming both)."""
    from affpipe.io import jsonable
    from affpipe.lineage import check, resolve_path
    from affpipe.run.crops import spec_of

    folder = Path(folder)
    m = read_manifest_of(folder)
    where = folder / MANIFEST_FILE
    kind = m.get("source_kind", "run")
    try:
        backbone, size = str(m["backbone"]), int(m["image_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: no readable {exc} (a feature table's manifest names its backbone and image size)") \
            from None
    path = None
    if kind != "published":
        if not m.get("source_checkpoint"):
            raise ValueError(f"{where}: records no source checkpoint; predicting on crops needs the encoder that "
                             "embedded the table")
        path = resolve_path(folder, m["source_checkpoint"])
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: was embedded by {path}, which is not there (moved?); predicting on "
                                    "crops needs that encoder")
    cfg = EmbedConfig(source="imagenet" if kind == "published" else "weights" if kind == "weights" else str(path),
                      shards=folder, out=folder, backbone=backbone if kind != "run" else None,
                      weights=path if kind == "weights" else None, image_size=size)
    enc = load_encoder(cfg, torch.device("cpu"))
    check("the encoder", m.get("source_sha256"), enc.sha256, str(where), str(enc.checkpoint))
    if enc.width != m.get("feature_dim") or jsonable(enc.input) != jsonable(m.get("input", enc.input)):
        raise ValueError(f"{where}: its encoder rebuilt from {enc.checkpoint} gives {enc.width}-wide features with "
                         f"input {jsonable(enc.input)}, the table {m.get('feature_dim')} with {m.get('input')}")
    return enc.backbone.cpu().eval(), spec_of(enc.model_cfg, enc.image_size, enc.width, enc.source, enc.sha256)


def _splits(cfg: EmbedConfig, manifest: dict) -> list[str]:
    have = list(manifest["splits"])
    if cfg.split == "all":
        return have
    if cfg.split not in have:
        raise ValueError(f"{cfg.shards}: no split {cfg.split!r} in the shards (has {have})")
    return [cfg.split]


class _Stats:
    def __init__(self) -> None:
        self.frames, self.wait, self.time = 0, 0.0, 0.0
        self.backend = ""


def _view(root: Path, split: str, todo: list[tuple[int, Path, Path]]) -> Path:
    """A folder of links to the shards still to embed, laid out as ``<view>/<split>/*.tar`` so
    the ordinary loaders read exactly them, in manifest order (names sort like the indices).
    It lives in a temporary folder: the table's folder never holds a link."""
    (root / split).mkdir(parents=True)
    for k, tar, idx in todo:
        (root / split / f"{k:06d}.tar").symlink_to(tar.resolve())
        (root / split / f"{k:06d}.idx").symlink_to(idx.resolve())
    return root


class _Chunker:
    """Cuts the loader's batches at shard boundaries into chunks of ``batch_size`` counted from
    each shard's first sample, so a shard's features are computed from the same chunks whether
    the run was resumed or not (the same bytes)."""

    def __init__(self, counts: list[int], batch_size: int) -> None:
        self.counts, self.batch_size = counts, batch_size
        self.images: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.have, self.shard, self.done = 0, 0, 0  # buffered samples; shard in progress; its samples done

    def add(self, images: torch.Tensor, row_id: torch.Tensor) -> None:
        self.images.append(images)
        self.ids.append(row_id)
        self.have += len(row_id)

    def chunks(self):
        """``(shard position, images, row ids, last chunk of the shard)`` while buffered samples allow."""
        while self.shard < len(self.counts):
            need = min(self.batch_size, self.counts[self.shard] - self.done)
            if need > self.have:
                return
            images, ids = torch.cat(self.images), torch.cat(self.ids)
            self.images, self.ids = [images[need:]], [ids[need:]]
            self.have -= need
            self.done += need
            last = self.done == self.counts[self.shard]
            # one memory layout whatever the loader's batches were: the backbone's kernels (and
            # so the float results) depend on it
            yield self.shard, images[:need].contiguous(memory_format=torch.channels_last), ids[:need], last
            if last:
                self.shard, self.done = self.shard + 1, 0


def _embed_split(cfg: EmbedConfig, encs: list[Encoder], claims: list[Claim], split: str, device: torch.device,
                 stats: _Stats) -> None:
    """Embed the shards of ``split`` whose part is missing from some table's folder, one part per
    shard and table; one loader for all of them, so each frame is decoded once."""
    import tempfile

    from affpipe.dist import autocast
    from affpipe.loaders import make_loader
    from affpipe.loaders.base import find_shards
    from affpipe.shards.format import read_idx_header

    shards = find_shards(cfg.shards, split)
    todo = [(k, tar, idx) for k, (tar, idx) in enumerate(shards)
            if not all(c.path(_part(split, k)).is_file() for c in claims)]
    if not todo:
        log.info("embed: %s: all %d shards already embedded", split, len(shards))
        return
    counts = [read_idx_header(idx)[1] for _, _, idx in todo]
    amp = cfg.amp if device.type == "cuda" else "none"
    chunker = _Chunker(counts, cfg.batch_size)
    bar = tqdm(total=sum(counts), desc=f"embed {split}", unit="frame", dynamic_ncols=True, mininterval=1.0)
    t0 = t_wait = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="affpipe-embed-") as tmp, torch.inference_mode():
        loader = make_loader(_view(Path(tmp), split, todo), split, batch_size=cfg.batch_size, train=False, device=device,
                             image_size=encs[0].image_size, rank=0, world_size=1, normalize=False, loader=cfg.loader)
        if loader.backend != stats.backend:
            log.info("embed: %s: loader backend %s (%s workers), device %s", split, loader.backend,
                     "default" if cfg.loader.num_workers is None else cfg.loader.num_workers, device)
            stats.backend = loader.backend
        feats = [[np.zeros((0, e.width), np.float16)] for e in encs]
        ids: list[np.ndarray] = [np.zeros(0, np.int64)]
        for batch in itertools.chain(loader, [None]):  # None: flush the shards without a sample at the end
            stats.wait += time.perf_counter() - t_wait
            if batch is not None:
                chunker.add(batch.images, batch.row_id)
            for pos, images, row_id, last in chunker.chunks():
                if len(row_id):
                    for e, enc in enumerate(encs):  # the decoded frames go through every backbone
                        with autocast(device, amp):
                            out = enc.backbone(images)
                        feats[e].append(out.float().cpu().numpy().astype(np.float16))
                    ids.append(row_id.cpu().numpy())
                    bar.update(len(row_id))
                if last:  # a shard is complete: its part in each table that lacks it
                    for e, c in enumerate(claims):
                        part = c.path(_part(split, todo[pos][0]))
                        if not part.is_file():
                            write_part(part, np.concatenate(ids), _finite(np.concatenate(feats[e]), encs[e], part))
                    feats, ids = [f[:1] for f in feats], ids[:1]
            t_wait = time.perf_counter()
    bar.close()
    stats.frames += sum(counts)
    stats.time += time.perf_counter() - t0
    if chunker.shard < len(todo):
        raise ValueError(f"embed: {split}: the loader yielded fewer samples than the shards' indexes list")


def _finite(feats: np.ndarray, enc: Encoder, part: Path) -> np.ndarray:
    """``feats`` when every value is finite, else one error before the part is written (a NaN
    table is refused at the first shard, not after the whole pass)."""
    bad = nonfinite_rows(feats)
    if len(bad):
        raise ValueError(f"{part}: {len(bad)} of {len(feats)} frames embedded by {enc.source} are NaN or infinite "
                         "(weights holding NaN, or an fp16 overflow: try --amp none); nothing written for it")
    return feats


def _part(split: str, k: int) -> str:
    return f"{PARTS_DIR}/{split}-{k:06d}.arrow"


OWNER = Owner("embed", (TABLE_FILE, MANIFEST_FILE, f"{PARTS_DIR}/*.arrow", SCRATCH_FILE))


def embed_inputs(cfg: EmbedConfig, enc: Encoder, splits: list[str], shard_manifest: dict, device: torch.device) -> dict:
    """What a table is made from (the folder's marker records it): a folder started from other
    inputs is refused, so one table never mixes two sources."""
    from affpipe.shards.format import shards_fingerprint

    return {"source": enc.source, "source_sha256": enc.sha256, "backbone": enc.arch, "image_size": enc.image_size,
            "input": enc.input, "shards_fingerprint": shards_fingerprint(shard_manifest), "splits": splits, "batch_size": cfg.batch_size,
            "device": device.type, "amp": cfg.amp if device.type == "cuda" else "none"}


def embed(cfg: EmbedConfig) -> dict[str, Any]:
    """Write ``cfg.out/features.arrow`` + ``manifest.json``; returns the manifest (with several
    backbones: ``{"tables": [manifest, ...]}``, one table per ``OUT/<name>``). Each folder is
    claimed (``affpipe.outdir``): a rerun with the same inputs resumes, other inputs are refused
    unless ``cfg.overwrite``."""
    from contextlib import ExitStack

    from affpipe.dist import pick_device
    from affpipe.shards.format import read_manifest, shard_labels

    shard_manifest = read_manifest(cfg.shards)
    splits = _splits(cfg, shard_manifest)
    labels = shard_labels(cfg.shards, shard_manifest)  # frames.parquet, read once
    device = pick_device(cfg.device)
    folders = cfg.folders()
    encs = [load_encoder(cfg, device, k) for k in range(len(folders))]
    manifests: list[dict[str, Any] | None] = [None] * len(encs)
    with ExitStack() as stack:
        claims = [stack.enter_context(claim(out, OWNER, embed_inputs(cfg, enc, splits, shard_manifest, device),
                                            overwrite=cfg.overwrite)) for out, enc in zip(folders, encs, strict=True)]
        for k, (out, c) in enumerate(zip(folders, claims, strict=True)):
            if MANIFEST_FILE in c.existing and TABLE_FILE in c.existing:
                log.info("embed: %s already holds this table (same inputs); nothing to do", out)
                _remove_parts(c)
                manifests[k] = read_manifest_of(out)
        todo = [k for k, m in enumerate(manifests) if m is None]
        stats = _Stats()
        if todo:
            for split in splits:
                _embed_split(cfg, [encs[k] for k in todo], [claims[k] for k in todo], split, device, stats)
        for k in todo:
            manifests[k] = _finish(cfg, encs[k], claims[k], labels, splits, stats, device,
                                   shared=[str(folders[j]) for j in todo if j != k])
    return manifests[0] if len(manifests) == 1 else {"tables": manifests}


def _finish(cfg: EmbedConfig, enc: Encoder, c: Claim, labels, splits: list[str],
            stats: _Stats, device: torch.device, shared: list[str]) -> dict[str, Any]:
    """Merge one table's parts and write its manifest (lineage, input op, throughput)."""
    from affpipe.lineage import rel_path
    from affpipe.shards.format import shards_fingerprint

    out = c.out
    index, table, shard_manifest = labels.index, labels.table_name, labels.manifest
    files = sorted(p for s in splits for p in (out / PARTS_DIR).glob(f"{s}-*.arrow"))
    rows = merge_parts(files, out, _lookup(labels.table, index))
    manifest = {
        "schema_version": FEATURE_SCHEMA_VERSION, "source": enc.source, "source_kind": enc.kind,
        "source_checkpoint": rel_path(out, enc.checkpoint) if enc.checkpoint else None,
        "source_sha256": enc.sha256, "backbone": enc.arch, "image_size": enc.image_size, "input": enc.input,
        "feature_dim": enc.width, "dtype": "float16", "index": rel_path(out, index),
        "index_fingerprint": labels.fingerprint,
        "table": table, "shards": rel_path(out, cfg.shards), "shards_fingerprint": shards_fingerprint(shard_manifest),
        "splits": splits, "rows": rows,
        "loader": {"backend": stats.backend or "none (every shard was already embedded)",
                   "num_workers": cfg.loader.num_workers},
        # with several backends in one pass, the frames/s are those of the whole pass
        "throughput": {"frames": stats.frames, "seconds": stats.time, "device": str(device),
                       "frames_per_s": stats.frames / stats.time if stats.time else None,
                       "data_wait_share": stats.wait / stats.time if stats.time else None,
                       "shared_with": shared},
    }
    manifest["fingerprint"] = features_fingerprint(manifest)
    write_manifest(out, manifest)
    _remove_parts(c)
    log.info("embed: %d rows x %d features → %s", rows, manifest["feature_dim"], out / TABLE_FILE)
    return manifest


def _remove_parts(c: Claim) -> None:
    """The parts, once merged: only our files, then the folder if it is empty (a user's file in it
    would have been refused when the folder was claimed)."""
    parts = c.out / PARTS_DIR
    if parts.is_dir() and not parts.is_symlink():
        for p in parts.glob("*.arrow"):
            if c.owner.owns(p.relative_to(c.out).as_posix()) and not p.is_symlink():
                p.unlink()
        if not any(parts.iterdir()):
            parts.rmdir()


def _width(enc: Encoder, device: torch.device) -> int:
    with torch.inference_mode():
        x = torch.zeros(1, 3, enc.image_size, enc.image_size, dtype=torch.uint8, device=device)
        return int(enc.backbone.eval()(x).shape[1])


def _lookup(table, index: Path):
    """``row_id → (video, frame, split)`` over the label table (an error for an unknown id)."""
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
