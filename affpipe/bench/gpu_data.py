"""Data for ``affpipe.bench.gpu`` on a bare GPU host, which may lack OpenCV and tqdm.

Without cv2, ``affpipe.synth.generate`` cannot draw faces: a PIL-only fallback tree stands in (its
images carry no faces, its labels no signal — enough to time decoding and training). Without
tqdm, a silent stand-in lets the index and shard stages import; they then run in one process.
"""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

from affpipe.dist import usable_cores

log = logging.getLogger("affpipe.bench.gpu")


# ---- guards for a bare GPU host ------------------------------------------------------------


class _SilentBar:
    """What affpipe's stages use of ``tqdm.tqdm``, doing nothing."""

    def __init__(self, iterable=None, *args, **kwargs):
        self.iterable, self.n = iterable, 0

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_description(self, *args, **kwargs) -> None:
        pass


def ensure_tqdm() -> bool:
    """True when tqdm is importable; else install a silent stand-in so the stages import.

    The stand-in exists only in this process: callers must keep the stages' work in-process
    (``workers=1``), since spawned pool workers would import the real, missing module.
    """
    try:
        import tqdm  # noqa: F401
        import tqdm.auto  # noqa: F401

        return True
    except ImportError:
        import types

        mod = types.ModuleType("tqdm")
        mod.tqdm = _SilentBar
        mod.auto = mod
        sys.modules["tqdm"] = sys.modules["tqdm.auto"] = mod
        log.warning("tqdm is not installed: progress bars off, index and shards run in one process")
        return False


def cv2_available() -> bool:
    try:
        import cv2  # noqa: F401

        return True
    except ImportError:
        return False


_AU_HEADER = "AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26"
_EXPR_HEADER = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"


def fallback_tree(root: Path, *, videos: int, frames: int, seed: int, pool: int = 256) -> Path:
    """An abaw6-layout tree without OpenCV: a pool of smooth random PIL JPEGs, random labels.

    Used when ``affpipe.synth.generate`` cannot run (no cv2 on the GPU host). The images carry no face
    and the labels no signal — enough to time decoding and training, nothing else. Every 4th
    video is a validation video.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = root / "cropped_aligned"
    ann = root / "6th ABAW Annotations"
    jpegs = []
    for _ in range(pool):  # 8x8 noise upscaled: ~Aff-Wild2-like JPEG sizes (a few KB), not noise-sized ones
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize((112, 112), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    for v in range(videos):
        video = f"{v:03d}-bench"
        split = "Validation_Set" if v % 4 == 3 else "Train_Set"
        d = images / video
        d.mkdir(parents=True)
        for f in range(1, frames + 1):
            (d / f"{f:05d}.jpg").write_bytes(jpegs[(v * 7919 + f) % pool])
        va = rng.uniform(-1, 1, (frames, 2))
        expr = rng.integers(0, 8, frames)
        au = rng.integers(0, 2, (frames, 12))
        for challenge, header, body in (
            ("VA_Estimation_Challenge", "valence,arousal", [f"{a:.3f},{b:.3f}" for a, b in va]),
            ("EXPR_Recognition_Challenge", _EXPR_HEADER, [str(e) for e in expr]),
            ("AU_Detection_Challenge", _AU_HEADER, [",".join(map(str, r)) for r in au]),
        ):
            p = ann / challenge / split
            p.mkdir(parents=True, exist_ok=True)
            (p / f"{video}.txt").write_text(header + "\n" + "\n".join(body) + "\n")
    return root


def gpu_data(cache: Path, *, videos: int, frames: int, seed: int, source: str = "auto") -> dict:
    """Tree → index → train shards under ``cache``: ``affpipe.synth.generate`` or the cv2-free fallback."""
    from affpipe.twin import prepare_data

    real_tqdm = ensure_tqdm()
    workers = usable_cores() if real_tqdm else 1
    if source == "auto":
        source = "synth" if cv2_available() else "fallback"
    if source == "synth":
        return prepare_data(cache, videos=videos, frames=frames, seed=seed, workers=workers,
                            source="affpipe.synth.generate")
    return prepare_data(cache, videos=videos, frames=frames, seed=seed, workers=workers,
                        make_tree=lambda tree: fallback_tree(tree, videos=videos, frames=frames, seed=seed),
                        source="fallback (PIL images, random labels: no cv2 here)")
