"""``affpipe crop``: raw videos (or folders of photos) → an Aff-Wild2-shaped tree of aligned crops.

Output folder ``TREE`` (owned by ``crop``: :mod:`affpipe.outdir`):

- ``cropped_aligned/<track>/NNNNN.jpg``: 112×112 aligned faces, named by frame number (from 1),
  one folder per track (``<video>``, ``<video>_left``/``_right``, ``<video>_1``…); a frame where
  a track has no face has no file, as in the release. ``affpipe index`` reads this folder as an
  image root (videos without annotations are split ``test``).
- ``crop_tables/<video>.parquet``: one row per face per decoded frame, and one row (track null)
  for a frame without a face: frame, time, track, folder, image, box, landmarks, score.
- ``crop_tables/<video>.plan.json`` while a video is being written, ``<video>.done.json`` once it
  is whole. A rerun skips done videos and redoes an unfinished one from scratch (its planned
  files deleted first), so a kill -9 at any point ends in the same bytes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from affpipe.dist import usable_cores
from affpipe.io import atomic_write_text, write_parquet
from affpipe.outdir import Claim, Owner, claim
from affpipe.video.detect import ALIGNMENT, CROP_SIZE, TEMPLATE_112, FaceDetector, detector_version
from affpipe.video.pipeline import VideoFaces, find_faces
from affpipe.video.sources import Source, find_sources, probe
from affpipe.video.track import build_tracks, track_names

log = logging.getLogger(__name__)

IMAGES = "cropped_aligned"
TABLES = "crop_tables"
CROP_OWNER = Owner("crop", (f"{IMAGES}/*/*.jpg", f"{TABLES}/*.parquet", f"{TABLES}/*.json"))
CROP_VERSION = 1

TABLE_SCHEMA = pa.schema([
    ("frame", pa.int32()), ("time", pa.float64()), ("track", pa.int16()), ("folder", pa.string()),
    ("image", pa.string()), ("box", pa.list_(pa.float32(), 4)), ("landmarks", pa.list_(pa.float32(), 10)),
    ("score", pa.float32()),
])


@dataclass(frozen=True)
class CropConfig:
    """Options of ``affpipe crop`` (see ``affpipe crop --help``)."""

    inputs: tuple[Path, ...]
    out: Path
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int = 16
    detect_size: int = 640  # longest side of the frame the detector sees (crops come from full res)
    min_face: int = 20  # MTCNN's smallest face, pixels of the detector's frame
    min_score: float = 0.9
    min_track: int = 8  # frames; shorter tracks are dropped (counted)
    max_gap: int = 25  # frames a track may miss and still continue
    jpeg_quality: int = 95
    workers: int = 0  # encode threads; 0 = the usable cores
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("crop: give at least one video file or folder")
        for name in ("batch_size", "detect_size", "min_face", "min_track", "max_gap"):
            if getattr(self, name) < 1:
                raise ValueError(f"crop: {name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"crop: jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"crop: min_score must be in [0, 1], got {self.min_score}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"crop: device must be auto, cpu or cuda, got {self.device!r}")

    def settings(self) -> dict:
        """Everything that changes the output's bytes (recorded in the folder's marker)."""
        keep = ("batch_size", "detect_size", "min_face", "min_score", "min_track", "max_gap", "jpeg_quality")
        return {"detector": detector_version(), "alignment": ALIGNMENT, "template": TEMPLATE_112.tolist(),
                "size": CROP_SIZE, "version": CROP_VERSION} | {k: v for k, v in asdict(self).items() if k in keep}


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return name


def crop(cfg: CropConfig) -> dict:
    """Crop every source of ``cfg.inputs`` into ``cfg.out``; returns the summary (see
    :func:`format_summary`). Refusals (bad input, a folder of other inputs) come before any write."""
    t0 = time.perf_counter()
    sources, ignored = find_sources(tuple(Path(p) for p in cfg.inputs))
    for s in sources:
        probe(s)
    # flat, so a refusal names just what changed ("min_track: 4 ... vs 5", "source a: ...")
    inputs = cfg.settings() | {f"source {s.name}": s.fingerprint() for s in sources}
    names = {s.name for s in sources}
    records: list[dict] = []
    # the detector is loaded before the folder is claimed: a missing package leaves nothing behind
    todo = cfg.overwrite or any(_done_record(Path(cfg.out), s.name) is None for s in sources)
    detector = FaceDetector(_device(cfg.device), cfg.min_face) if todo else None
    with claim(cfg.out, CROP_OWNER, inputs, overwrite=cfg.overwrite) as folder:
        with ThreadPoolExecutor(cfg.workers or usable_cores(), thread_name_prefix="crop-encode") as pool:
            for s in sources:
                _tidy(folder, s.name)
                rec = _done_record(folder.out, s.name)
                if rec is None:
                    rec = _crop_one(s, folder, detector, pool, cfg, names - {s.name})
                else:
                    rec = rec | {"resumed": True}
                records.append(rec)
    summary = _summarize(records, ignored, time.perf_counter() - t0)
    log.info("cropped %d video(s): %d frames, %d crops in %.1f s", summary["videos"], summary["frames"],
             summary["crops"], summary["seconds"])
    return summary


def _done_record(out: Path, name: str) -> dict | None:
    path = out / TABLES / f"{name}.done.json"
    if not path.is_file() or path.is_symlink():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("name") == name else None


def _tidy(folder: Claim, name: str) -> None:
    """Remove what a kill can leave of video ``name`` beside whole files: temporaries of the
    atomic writes, and the plan of a video whose done record was written just before the kill."""
    tables = folder.out / TABLES
    for suffix in (".parquet.tmp", ".plan.json.tmp", ".done.json.tmp"):
        (tables / f"{name}{suffix}").unlink(missing_ok=True)
    if _done_record(folder.out, name) is not None:
        (tables / f"{name}.plan.json").unlink(missing_ok=True)


def _clean_unfinished(folder: Claim, name: str) -> None:
    """Delete what an interrupted run of video ``name`` wrote (the folders its plan names)."""
    plan_path = folder.out / TABLES / f"{name}.plan.json"
    if plan_path.is_file():
        try:
            plan = json.loads(plan_path.read_text())
        except (OSError, ValueError):
            plan = {}
        for sub in plan.get("folders", []):
            d = folder.out / IMAGES / sub
            if d.is_dir() and not d.is_symlink():
                for f in sorted(d.iterdir()):
                    if f.is_file() and not f.is_symlink() and CROP_OWNER.owns(f"{IMAGES}/{sub}/{f.name}"):
                        f.unlink()
                if not any(d.iterdir()):
                    d.rmdir()
        plan_path.unlink()
    (folder.out / TABLES / f"{name}.parquet").unlink(missing_ok=True)


def _crop_one(source: Source, folder: Claim, detector: FaceDetector, pool: ThreadPoolExecutor,
              cfg: CropConfig, others: set[str]) -> dict:
    from tqdm import tqdm

    _clean_unfinished(folder, source.name)
    t0 = time.perf_counter()
    with tqdm(desc=f"crop {source.name}", unit="frame", disable=not cfg.progress, leave=False) as bar:
        faces = find_faces(source, detector, pool, batch_size=cfg.batch_size, detect_size=cfg.detect_size,
                           min_score=cfg.min_score, jpeg_quality=cfg.jpeg_quality, progress=bar.update)
    tracks, dropped = build_tracks([d.boxes for d in faces.detections], min_length=cfg.min_track, max_gap=cfg.max_gap)
    folders = track_names(source.name, len(tracks))
    clash = sorted(set(folders) & others)
    if clash:
        raise ValueError(f"{source.path}: its track folder {clash[0]!r} is also the name of another input video; "
                         "rename one of them or crop them into separate folders")
    owner = {m: (k, folders[k]) for k, tr in enumerate(tracks) for m in tr.members}
    atomic_write_text(folder.path(f"{TABLES}/{source.name}.plan.json"),
                      json.dumps({"name": source.name, "folders": folders}, indent=1) + "\n")
    written = _write_crops(faces, owner, folder, pool)
    write_parquet(_table(faces, owner), folder.path(f"{TABLES}/{source.name}.parquet"), compression="zstd")
    info = faces.info
    rec = {
        "name": source.name, "source": str(source.path), "kind": source.kind, "frames": info.decoded,
        "frames_expected": info.expected, "truncated": bool(source.kind == "video" and info.expected
                                                           and info.decoded < info.expected),
        "bad_frames": info.bad, "rotation": info.rotation,
        "faces": sum(len(d.scores) for d in faces.detections), "crops": sum(written.values()),
        "tracks": dict(sorted(written.items())), "tracks_dropped": dropped, "device": str(detector.device),
    }
    os.sync()  # the crops are on disk before the record that says the video is whole
    atomic_write_text(folder.path(f"{TABLES}/{source.name}.done.json"), json.dumps(rec, indent=1) + "\n")
    folder.path(f"{TABLES}/{source.name}.plan.json").unlink()
    log.info("%s: %d frames, %d crops in %d track(s) in %.1f s", source.name, info.decoded, rec["crops"],
             len(folders), time.perf_counter() - t0)
    return rec


def _write_crops(faces: VideoFaces, owner: dict, folder: Claim, pool: ThreadPoolExecutor) -> dict[str, int]:
    counts: dict[str, int] = {}
    jobs = []
    for (pos, j), fut in sorted(faces.crops.items()):
        if (pos, j) not in owner:
            fut.cancel()
            continue
        _, sub = owner[(pos, j)]
        path = folder.path(f"{IMAGES}/{sub}/{faces.frames[pos]:05d}.jpg")
        counts[sub] = counts.get(sub, 0) + 1
        jobs.append(pool.submit(_write_file, path, fut))
    for job in jobs:
        job.result()
    return counts


def _write_file(path: Path, fut) -> None:
    with open(path, "wb") as fh:
        fh.write(fut.result())


def _table(faces: VideoFaces, owner: dict) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in TABLE_SCHEMA}
    for pos, d in enumerate(faces.detections):
        for j in range(max(1, len(d.scores))):
            has = j < len(d.scores)
            k, sub = owner.get((pos, j), (None, None)) if has else (None, None)
            cols["frame"].append(faces.frames[pos])
            cols["time"].append(faces.times[pos])
            cols["track"].append(k)
            cols["folder"].append(sub)
            cols["image"].append(f"{sub}/{faces.frames[pos]:05d}.jpg" if sub else None)
            cols["box"].append(d.boxes[j].tolist() if has else None)
            cols["landmarks"].append(d.landmarks[j].reshape(-1).tolist() if has else None)
            cols["score"].append(float(d.scores[j]) if has else None)
    return pa.table([pa.array(cols[f.name], f.type) for f in TABLE_SCHEMA], schema=TABLE_SCHEMA)


def _summarize(records: list[dict], ignored: list[str], seconds: float) -> dict:
    frames = sum(r["frames"] for r in records)
    return {
        "videos": len(records), "resumed": sum(1 for r in records if r.get("resumed")),
        "frames": frames, "faces": sum(r["faces"] for r in records), "crops": sum(r["crops"] for r in records),
        "tracks": sum(len(r["tracks"]) for r in records), "tracks_dropped": sum(r["tracks_dropped"] for r in records),
        "no_face": [r["name"] for r in records if not r["tracks"]],
        "truncated": [r["name"] for r in records if r["truncated"]],
        "bad_frames": sum(r["bad_frames"] for r in records), "rotated": [r["name"] for r in records if r["rotation"]],
        "ignored_files": ignored, "seconds": round(seconds, 2),
        "fps": round(frames / seconds, 1) if seconds > 0 else None, "per_video": records,
    }


def format_summary(s: dict) -> str:
    """The lines ``affpipe crop`` prints."""
    lines = [f"{s['videos']} video(s) ({s['resumed']} already done), {s['frames']} frames, {s['faces']} faces, "
             f"{s['crops']} crops in {s['tracks']} track(s); {s['tracks_dropped']} short track(s) dropped; "
             f"{s['seconds']} s ({s['fps']} frames/s)"]
    if s["no_face"]:
        lines.append(f"no face found in {len(s['no_face'])} video(s): {', '.join(s['no_face'])}")
    if s["truncated"]:
        lines.append(f"fewer frames decoded than the header announces (truncated?) in: {', '.join(s['truncated'])}")
    if s["bad_frames"]:
        lines.append(f"unreadable photos (frames without a crop): {s['bad_frames']}")
    if s["rotated"]:
        lines.append(f"rotation metadata honoured in: {', '.join(s['rotated'])}")
    if s["ignored_files"]:
        lines.append(f"not read (neither video nor photo): {len(s['ignored_files'])} file(s), e.g. {s['ignored_files'][0]}")
    return "\n".join(lines)
