"""MTCNN's three stages over a batch of frames, with the image work done by OpenCV.

The networks (PNet, RNet, ONet), their weights and the box arithmetic (``generateBoundingBox``,
``bbreg``, ``rerec``, ``pad``, the NMS) are facenet-pytorch's; only how the images are cut and
resized differs from its ``detect_face``. There every pyramid level is resized as a float tensor
and every candidate box is cropped and resized by its own ``interpolate(mode="area")`` call —
on a CPU that was half of the detector's time (~2.5 ms a candidate, ~75 candidates a frame).
Here the pyramid and the candidates are resized by ``cv2.resize(INTER_AREA)`` on the uint8 frame
(the same area averaging, ~0.2 ms a candidate on the same busy machine, the GIL released), and the networks get one batch
per stage. A candidate box of zero size is dropped together with its box (facenet-pytorch skips
its image but keeps the box, which shifts the ones after it).
"""

from __future__ import annotations

from types import ModuleType

import cv2
import numpy as np
import torch
from torchvision.ops.boxes import batched_nms


def _normalize(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float()
    return (t - 127.5) * 0.0078125


def _crops(frames: np.ndarray, image_inds: np.ndarray, boxes: torch.Tensor, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each box (1-based inclusive pixels, clipped as facenet-pytorch's ``pad``) of its frame,
    resized to ``size``²; and the mask of boxes that had any pixel."""
    h, w = frames.shape[1:3]
    b = boxes[:, :4].trunc().int().cpu().numpy()
    x, y = np.maximum(b[:, 0], 1), np.maximum(b[:, 1], 1)
    ex, ey = np.minimum(b[:, 2], w), np.minimum(b[:, 3], h)
    ok = (ey > y - 1) & (ex > x - 1)
    out = np.empty((int(ok.sum()), size, size, 3), np.uint8)
    for n, k in enumerate(np.flatnonzero(ok)):
        out[n] = cv2.resize(frames[image_inds[k], y[k] - 1:ey[k], x[k] - 1:ex[k]], (size, size),
                            interpolation=cv2.INTER_AREA)
    return out, ok


def detect_batch(frames: np.ndarray, nets: tuple, helpers: ModuleType, *, min_face: int,
                 thresholds: list[float], factor: float, device: torch.device) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Boxes ``[N,5]`` (x1, y1, x2, y2, score) and points ``[N,5,2]`` of each frame of
    ``frames`` (``[B,H,W,3]`` uint8 RGB, equal sizes), as facenet-pytorch's ``detect_face``."""
    pnet, rnet, onet = nets
    bsz, h, w = frames.shape[:3]
    m = 12.0 / min_face
    minl = min(h, w) * m
    scales = []
    while minl >= 12:
        scales.append(m * factor ** len(scales))
        minl *= factor
    boxes_l, inds_l = [], []
    for scale in scales:
        sz = (int(w * scale + 1), int(h * scale + 1))
        level = np.stack([cv2.resize(f, sz, interpolation=cv2.INTER_AREA) for f in frames])
        reg, probs = pnet(_normalize(level, device))
        b, i = helpers.generateBoundingBox(reg, probs[:, 1], scale, thresholds[0])
        pick = batched_nms(b[:, :4], b[:, 4], i, 0.5)
        boxes_l.append(b[pick])
        inds_l.append(i[pick])
    boxes, inds = torch.cat(boxes_l), torch.cat(inds_l)
    pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
    boxes, inds = boxes[pick], inds[pick]
    regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                         boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh, boxes[:, 4]], 1)
    boxes = helpers.rerec(boxes)
    points = torch.zeros(0, 5, 2, device=device)
    if len(boxes):  # second stage: RNet on 24×24 crops
        crops, ok = _crops(frames, inds.cpu().numpy(), boxes, 24)
        boxes, inds = boxes[torch.from_numpy(ok).to(boxes.device)], inds[torch.from_numpy(ok).to(inds.device)]
        if len(boxes):
            reg, prob = rnet(_normalize(crops, device))
            keep = prob[:, 1] > thresholds[1]
            boxes = torch.cat([boxes[keep, :4], prob[keep, 1:2]], 1)
            inds, reg = inds[keep], reg[keep]
            pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
            boxes = helpers.rerec(helpers.bbreg(boxes[pick], reg[pick]))
            inds = inds[pick]
    if len(boxes):  # third stage: ONet on 48×48 crops, with the landmarks
        crops, ok = _crops(frames, inds.cpu().numpy(), boxes, 48)
        boxes, inds = boxes[torch.from_numpy(ok).to(boxes.device)], inds[torch.from_numpy(ok).to(inds.device)]
        if len(boxes):
            reg, pts, prob = onet(_normalize(crops, device))
            keep = prob[:, 1] > thresholds[2]
            boxes = torch.cat([boxes[keep, :4], prob[keep, 1:2]], 1)
            inds, reg, pts = inds[keep], reg[keep], pts[keep]
            wi = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
            hi = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
            points = torch.stack([wi * pts[:, :5] + boxes[:, 0:1] - 1, hi * pts[:, 5:] + boxes[:, 1:2] - 1], 2)
            boxes = helpers.bbreg(boxes, reg)
            pick = helpers.batched_nms_numpy(boxes[:, :4], boxes[:, 4], inds, 0.7, "Min")
            boxes, inds, points = boxes[pick], inds[pick], points[pick]
    else:
        boxes = torch.zeros(0, 5, device=device)
    boxes_np, points_np, inds_np = boxes.cpu().numpy(), points.cpu().numpy(), inds.cpu().numpy()
    return ([boxes_np[inds_np == b].reshape(-1, 5) for b in range(bsz)],
            [points_np[inds_np == b].reshape(-1, 5, 2) for b in range(bsz)])
