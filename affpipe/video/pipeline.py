"""One source through decode → detect → align → encode, overlapped.

A reader thread decodes frames and shrinks them for the detector (cv2 releases the GIL while it
decodes and resizes), the calling thread runs MTCNN on batches of ``batch_size`` frames (one
forward per pyramid level for the whole batch, instead of one per frame), and a thread pool warps
and JPEG-encodes each face from the full-resolution frame (cv2 again releases the GIL). Batches
are cut at fixed frame positions (and where the frame size changes), so a rerun computes the same
numbers. The encoded crops stay in memory (~5 kB a face) until the tracks are known, because a
crop's folder depends on the whole video's tracks.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from affpipe.video.detect import (
    Detections,
    FaceDetector,
    align_face,
    encode_jpeg,
    shrink_for_detection,
)
from affpipe.video.sources import FrameInfo, Source, read_frames

_DONE = object()


@dataclass
class VideoFaces:
    """Every decoded frame of a source and the faces found in it."""

    frames: list[int] = field(default_factory=list)
    times: list[float | None] = field(default_factory=list)
    detections: list[Detections] = field(default_factory=list)
    crops: dict[tuple[int, int], Future] = field(default_factory=dict)  # (frame position, face) -> JPEG bytes
    info: FrameInfo = field(default_factory=FrameInfo)


def _reader(source: Source, info: FrameInfo, detect_size: int, batch_size: int, out: queue.Queue,
            stop: threading.Event) -> None:
    """Put lists of ``(frame, time, bgr, rgb_small, scale)`` on ``out``; the batch is cut every
    ``batch_size`` frames and where the detector's input size changes (photos)."""
    try:
        batch: list = []
        shape = None  # the detector input size of the batch (frames that failed to decode have none)
        for frame_no, t, bgr in read_frames(source, info):
            if stop.is_set():
                return
            small, scale = shrink_for_detection(bgr, detect_size) if bgr is not None else (None, 1.0)
            if small is not None and shape is not None and small.shape != shape:
                out.put(batch)
                batch = []
            if small is not None:
                shape = small.shape
            batch.append((frame_no, t, bgr, small, scale))
            if len(batch) == batch_size:
                out.put(batch)
                batch, shape = [], None
        if batch:
            out.put(batch)
        out.put(_DONE)
    except BaseException as exc:  # handed to the consumer, which raises it
        out.put(exc)


def _batches(source: Source, info: FrameInfo, detect_size: int, batch_size: int) -> Iterator[list]:
    q: queue.Queue = queue.Queue(maxsize=2)  # bounds the full-resolution frames held in memory
    stop = threading.Event()
    th = threading.Thread(target=_reader, args=(source, info, detect_size, batch_size, q, stop),
                          name="crop-reader", daemon=True)
    th.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while th.is_alive():  # drain so a blocked put() can see the stop flag
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        th.join()


def _crop(bgr: np.ndarray, landmarks: np.ndarray, quality: int) -> bytes:
    return encode_jpeg(align_face(bgr, landmarks), quality)


def find_faces(source: Source, detector: FaceDetector, pool: ThreadPoolExecutor, *, batch_size: int,
               detect_size: int, min_score: float, jpeg_quality: int,
               progress: Callable[[int], None] = lambda n: None) -> VideoFaces:
    """Decode ``source``, detect its faces in batches and encode each face's aligned crop."""
    res = VideoFaces()
    for batch in _batches(source, res.info, detect_size, batch_size):
        dets: list[Detections] = [Detections.empty()] * len(batch)
        valid = [i for i, item in enumerate(batch) if item[3] is not None]
        if valid:
            found = detector.detect(np.stack([batch[i][3] for i in valid]), batch[valid[0]][4])
            for i, d in zip(valid, found, strict=True):
                keep = d.scores >= min_score
                dets[i] = Detections(d.boxes[keep], d.scores[keep], d.landmarks[keep])
        for (frame_no, t, bgr, _, _), d in zip(batch, dets, strict=True):
            pos = len(res.frames)
            res.frames.append(frame_no)
            res.times.append(t)
            res.detections.append(d)
            for j in range(len(d.scores)):
                res.crops[(pos, j)] = pool.submit(_crop, bgr, d.landmarks[j], jpeg_quality)
        progress(len(batch))
    return res
