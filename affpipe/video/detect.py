"""Faces and their five landmarks (MTCNN, batched), and the five-point alignment to 112×112.

The detector is facenet-pytorch's MTCNN: its three small networks ship inside the wheel
(``facenet_pytorch/data/{pnet,rnet,onet}.pt``), so nothing is downloaded, ever; they are loaded
here with ``torch.load(weights_only=True)``. Its five points (eyes, nose, mouth corners) are the
five points of the ArcFace/InsightFace 112×112 template the crops are aligned to.
"""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from affpipe._optional import import_mtcnn
from affpipe.video.mtcnn import detect_batch

CROP_SIZE = 112
# ArcFace/InsightFace's 112×112 five-point template: left eye, right eye, nose, mouth left, mouth right
# (left/right as seen in the image).
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)
ALIGNMENT = "similarity (least squares, Umeyama) to the ArcFace 112x112 five-point template"


@dataclass(frozen=True)
class Detections:
    """Faces of one frame, in full-resolution pixel coordinates: ``boxes [N,4]`` (x1, y1, x2, y2),
    ``scores [N]``, ``landmarks [N,5,2]``; sorted by x1 (then y1), so their order is stable."""

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))


def detector_version() -> str:
    """``facenet-pytorch <version>`` (recorded with the output)."""
    try:
        return f"facenet-pytorch {importlib.metadata.version('facenet-pytorch')} MTCNN"
    except importlib.metadata.PackageNotFoundError:
        return "facenet-pytorch MTCNN"


class FaceDetector:
    """MTCNN on ``device``; :meth:`detect` takes a batch of equal-size RGB frames at once."""

    def __init__(self, device: str = "cpu", min_face: int = 20,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7), factor: float = 0.709) -> None:
        mod = import_mtcnn()
        data = Path(mod.__file__).resolve().parent.parent / "data"
        nets = []
        for cls, name in ((mod.PNet, "pnet"), (mod.RNet, "rnet"), (mod.ONet, "onet")):
            net = cls(pretrained=False)
            path = data / f"{name}.pt"
            if not path.is_file():
                raise ImportError(f"{path}: missing from the facenet-pytorch install; reinstall it "
                                  "(pip install --force-reinstall --no-deps facenet-pytorch)")
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            nets.append(net.to(device).eval())
        self.pnet, self.rnet, self.onet = nets
        self._helpers = sys.modules[mod.detect_face.__module__]  # facenet-pytorch's box arithmetic
        self.device = torch.device(device)
        self.min_face = min_face
        self.thresholds = list(thresholds)
        self.factor = factor

    def detect(self, frames_rgb: np.ndarray, scale: float = 1.0) -> list[Detections]:
        """Faces of ``frames_rgb`` (``[B,H,W,3]`` uint8), divided by ``scale`` (the factor the
        frames were shrunk by for detection) to full-resolution coordinates."""
        with torch.inference_mode():
            boxes, points = detect_batch(frames_rgb, (self.pnet, self.rnet, self.onet), self._helpers,
                                         min_face=self.min_face, thresholds=self.thresholds, factor=self.factor,
                                         device=self.device)
        out = []
        for box, pts in zip(boxes, points, strict=True):
            box = np.asarray(box, np.float64).reshape(-1, 5)
            pts = np.asarray(pts, np.float64).reshape(-1, 5, 2)
            if len(box) == 0:
                out.append(Detections.empty())
                continue
            order = np.lexsort((box[:, 1], box[:, 0]))
            out.append(Detections((box[order, :4] / scale).astype(np.float32), box[order, 4].astype(np.float32),
                                  (pts[order] / scale).astype(np.float32)))
        return out


def similarity_matrix(src: np.ndarray, dst: np.ndarray = TEMPLATE_112) -> np.ndarray:
    """The 2×3 similarity (rotation, uniform scale, translation; no reflection) mapping ``src``
    points onto ``dst`` in the least-squares sense (Umeyama 1991, as InsightFace's alignment)."""
    src = np.asarray(src, np.float64).reshape(-1, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    var = (s ** 2).sum() / len(src)
    scale = (sig * np.diag(e)).sum() / var if var > 0 else 1.0
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]])


def align_face(frame_bgr: np.ndarray, landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The ``size``×``size`` crop of the face whose five ``landmarks`` (full-resolution pixels)
    land on the template (scaled to ``size``), warped from the full-resolution frame."""
    m = similarity_matrix(landmarks, TEMPLATE_112 * (size / CROP_SIZE))
    return cv2.warpAffine(frame_bgr, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0))


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a BGR image (cv2 releases the GIL: called from worker threads)."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("cv2.imencode failed on a face crop")
    return buf.tobytes()


def shrink_for_detection(frame_bgr: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The RGB frame the detector sees (longest side at most ``max_side``) and its scale."""
    h, w = frame_bgr.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = frame_bgr if scale == 1.0 else cv2.resize(frame_bgr, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                      interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_BGR2RGB), scale
