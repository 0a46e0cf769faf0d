"""``crop`` against the naive loop, side by side in one run (``affpipe bench``, or alone:
``python -m affpipe.bench.crop --out bench/crop``).

The naive loop is what a script does by default: for each decoded frame, shrink it, detect with
facenet-pytorch's own ``MTCNN.detect`` (one frame a call), align, ``cv2.imwrite`` each face. A
second row runs the same loop with affpipe's detector (the same networks and settings, OpenCV
cutting the candidates: :mod:`affpipe.video.mtcnn`), so the table separates what that buys from
what batching and overlapping buy. Same settings, alignment and JPEG quality everywhere. Both start
from nothing (the detector loaded inside the timing) and write into a fresh folder. The video is
a 640×360 clip of a real face (scikit-image's astronaut, in the dev extra), moving, growing and
tilting, with a mirrored second face for the second half.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from affpipe.bench.common import machine_info, machine_line, update_marked
from affpipe.dist import usable_cores

log = logging.getLogger(__name__)

TARGET_RATIO = 3.0  # DESIGN.md: crop ≥ 3× the naive loop on 2 cores
CROP_TITLE = "`crop`: videos to aligned crops (`make benchmark`)"
W, H, FPS = 640, 360, 25


def _face_patch() -> tuple[np.ndarray, str]:
    try:
        from skimage import data
    except ImportError as exc:
        raise ImportError("the crop benchmark's face is scikit-image's astronaut: pip install -e '.[dev]'") from exc
    rgb = data.astronaut()[30:230, 135:315]
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), "scikit-image astronaut"


def make_video(path: Path, frames: int = 96) -> str:
    """Write the benchmark clip (MJPG .avi); returns what face it shows."""
    patch, what = _face_patch()
    patch = cv2.resize(patch, (144, 160), interpolation=cv2.INTER_AREA)
    mirror = patch[:, ::-1].copy()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    for i in range(frames):
        f = np.full((H, W, 3), 90, np.uint8)
        for p, cx in ((patch, 160 + i), (mirror, 480 - i) if i >= frames // 2 else (None, 0)):
            if p is None:
                continue
            s = 1.0 + 0.003 * i
            m = cv2.getRotationMatrix2D((p.shape[1] / 2, p.shape[0] / 2), 4 * np.sin(i / 8), s)
            m[:, 2] += (cx - p.shape[1] / 2, H / 2 - p.shape[0] / 2)
            mask = cv2.warpAffine(np.full(p.shape[:2], 255, np.uint8), m, (W, H)) > 0
            f[mask] = cv2.warpAffine(p, m, (W, H))[mask]
        writer.write(f)
    writer.release()
    return what


class _StockMTCNN:
    """facenet-pytorch's ``MTCNN.detect`` behind :class:`affpipe.video.detect.FaceDetector`'s call."""

    def __init__(self) -> None:
        from affpipe._optional import import_mtcnn

        self.mtcnn = import_mtcnn().MTCNN(keep_all=True, select_largest=False, device="cpu")

    def detect(self, frames_rgb: np.ndarray, scale: float):
        from affpipe.video.detect import Detections

        boxes, probs, points = self.mtcnn.detect(frames_rgb[0], landmarks=True)
        if boxes is None:
            return [Detections.empty()]
        return [Detections((np.asarray(boxes, np.float32) / scale), np.asarray(probs, np.float32),
                           np.asarray(points, np.float32) / scale)]


def naive_loop(video: Path, out: Path, *, stock: bool = True, detect_size: int = 640, min_score: float = 0.9,
               quality: int = 95) -> int:
    """Detect (facenet-pytorch's MTCNN, or affpipe's with ``stock=False``), align and
    ``cv2.imwrite`` one frame at a time; returns frames read."""
    from affpipe.video.detect import FaceDetector, align_face, shrink_for_detection

    det = _StockMTCNN() if stock else FaceDetector("cpu")
    out.mkdir(parents=True, exist_ok=True)
    cap = cv2.VideoCapture(str(video))
    n = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        n += 1
        small, scale = shrink_for_detection(frame, detect_size)
        d = det.detect(small[None], scale)[0]
        for j in np.flatnonzero(d.scores >= min_score):
            cv2.imwrite(str(out / f"{n:05d}_{j}.jpg"), align_face(frame, d.landmarks[j]),
                        [cv2.IMWRITE_JPEG_QUALITY, quality])
    cap.release()
    return n


def crop_pipeline(video: Path, out: Path) -> int:
    """``affpipe crop`` on the CPU; returns frames read."""
    from affpipe.video import CropConfig, crop

    return crop(CropConfig(inputs=(video,), out=out, device="cpu", progress=False))["frames"]


def bench_model(path: Path) -> Path:
    """A multi-task ResNet-18 at 112 px (random weights: the figure is speed, not accuracy),
    exported as ``affpipe export`` writes it, for the ``predict --video`` figure."""
    import torch

    from affpipe.models.model import build_model
    from affpipe.run.config import TrainConfig, to_dict
    from affpipe.run.exported import write_export
    from affpipe.train.frames import FRAMES

    cfg = FRAMES.resolve(TrainConfig.of(task="mtl", shards=path.parent, device="cpu"))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    write_export({"model": model.state_dict(), "config": to_dict(cfg)}, path, source=path, source_sha256="bench")
    return path


def predict_pipeline(video: Path, out: Path, model: Path) -> int:
    """``affpipe predict MODEL --video VIDEO`` on the CPU, from nothing (crop included); returns frames."""
    from affpipe.runs.video import VideoPredictConfig, predict_video

    return predict_video(VideoPredictConfig(run=model, videos=(video,), out=out, device="cpu", progress=False))["frames"]


def bench_crop(out: Path, *, frames: int = 48, repeats: int = 3) -> dict:
    """Frames/s of the naive loop and of ``crop`` (median of ``repeats`` alternating runs)."""

    import tempfile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # a private folder of this run's own (deleted with everything in it, and nothing else of out's)
    with tempfile.TemporaryDirectory(prefix="affpipe-crop-bench-", dir=out) as work:
        return _bench_crop(Path(work), frames=frames, repeats=repeats)


def _bench_crop(work: Path, *, frames: int, repeats: int) -> dict:
    import torch

    video = work / "clip.avi"
    face = make_video(video, frames)
    load = [round(os.getloadavg()[0], 1)] if hasattr(os, "getloadavg") else []
    model = bench_model(work / "model.safetensors")
    rates: dict[str, list[float]] = {"naive": [], "naive_affpipe_detector": [], "crop": [], "predict_video": []}
    runs = (("naive", naive_loop), ("naive_affpipe_detector", lambda v, o: naive_loop(v, o, stock=False)),
            ("crop", crop_pipeline), ("predict_video", lambda v, o: predict_pipeline(v, o, model)))
    for r in range(repeats):
        for name, fn in runs:
            dst = work / f"{name}-{r}"
            t0 = time.perf_counter()
            n = fn(video, dst)
            rates[name].append(n / (time.perf_counter() - t0))
            shutil.rmtree(dst)
    load += [round(os.getloadavg()[0], 1)] if hasattr(os, "getloadavg") else []
    med = {k: statistics.median(v) for k, v in rates.items()}
    naive, fast = med["naive"], med["crop"]
    return {"video": f"{W}x{H}, {frames} frames, {face}", "cores": usable_cores(), "torch_threads": torch.get_num_threads(),
            "naive_fps": round(naive, 2), "naive_affpipe_detector_fps": round(med["naive_affpipe_detector"], 2),
            "crop_fps": round(fast, 2), "ratio": round(fast / naive, 2),
            "predict_video_fps": round(med["predict_video"], 2),
            "ratio_vs_affpipe_detector": round(fast / med["naive_affpipe_detector"], 2),
            "runs_fps": {k: [round(x, 2) for x in v] for k, v in rates.items()}, "target_ratio": TARGET_RATIO,
            "load_average_1min": load}  # at start and end: above the cores, the machine was shared


def crop_markdown(row: dict, machine: dict) -> str:
    """The BENCHMARKS.md section."""
    if "error" in row:
        return f"Machine: {machine_line(machine)}. Not measured: {row['error']}"
    met = "met" if row["ratio"] >= TARGET_RATIO else "NOT met"
    return "\n".join([
        f"Machine: {machine_line(machine)}; {machine.get('date', '')[:10]}; 1-min load average at start/end "
        f"{row.get('load_average_1min')} on {row['cores']} cores (above the cores: other work shared the machine). "
        f"Clip: {row['video']}; CPU, {row['torch_threads']} torch threads; "
        f"median of {len(row['runs_fps']['crop'])} alternating runs, "
        "the detector loaded inside each timed run.",
        "",
        "| pipeline | frames/s | × naive |",
        "|---|---:|---:|",
        f"| naive loop: decode, facenet-pytorch `MTCNN.detect` one frame, align, `cv2.imwrite` | {row['naive_fps']:.2f} | 1.00 |",
        f"| the same loop with affpipe's detector (OpenCV cuts the candidates), one frame a call | "
        f"{row['naive_affpipe_detector_fps']:.2f} | {row['naive_affpipe_detector_fps'] / row['naive_fps']:.2f} |",
        f"| `affpipe crop` (batched MTCNN, decode/encode threads) | {row['crop_fps']:.2f} | {row['ratio']:.2f} |",
        *([f"| `affpipe predict MODEL --video` end to end (crop, then a ResNet-18 MTL model at 112 px on every "
           f"crop, CSV/parquet/plot per track) | {row['predict_video_fps']:.2f} | "
           f"{row['predict_video_fps'] / row['naive_fps']:.2f} |"] if "predict_video_fps" in row else []),
        "",
        f"Target (DESIGN.md): ≥ {TARGET_RATIO:.0f}× the naive loop on 2 cores — {met} in this run. "
        f"Batching and overlapping alone (crop against the loop with affpipe's detector): "
        f"{row['ratio_vs_affpipe_detector']:.2f}×. Every run (frames/s): {row['runs_fps']}.",
    ])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    ap = argparse.ArgumentParser(prog="python -m affpipe.bench.crop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/crop"))
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", type=Path, default=None, help="BENCHMARKS.md to update (crop section)")
    a = ap.parse_args(argv)
    row = bench_crop(a.out, frames=a.frames, repeats=a.repeats)
    machine = machine_info()
    (a.out / "results.json").write_text(json.dumps({"machine": machine, "crop": row}, indent=1) + "\n")
    text = crop_markdown(row, machine)
    if a.markdown is not None:
        update_marked(a.markdown, "crop", text, title=CROP_TITLE)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
