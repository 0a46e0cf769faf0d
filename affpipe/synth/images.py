"""The twin's face JPEGs: rendered per video, or hard-linked from a small rendered pool at full scale.

A video's frames go into ``<root>/<video>.partial/`` and the folder is renamed when complete,
so a killed run never leaves a folder that looks whole."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from affpipe.synth.config import SynthConfig
from affpipe.synth.faces import FaceRenderer, Latent, encode_jpeg, simulate
from affpipe.synth.text import _write_file

_POOL_DIR = ".synth_pool"
_POOL_IDS, _POOL_FRAMES = 64, 128  # full scale: 64 identities x 128 rendered frames, hard-linked


class _Images:
    """Writes a video's frames into ``<root>/<video>.partial/`` and renames it when complete."""

    def __init__(self, out: Path, pool: Path | None):
        self.out, self.pool = out, pool
        self.names = [f"{i:05d}.jpg" for i in range(1, 100_000)]
        self.rendered = self.linked = 0
        self.render_s = self.images_s = 0.0  # CPU s drawing + encoding; wall s writing images

    def _start(self, final: Path) -> Path:
        part = final.with_name(final.name + ".partial")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        return part

    def render(self, final: Path, renderer: FaceRenderer, lat: Latent, frames: np.ndarray) -> None:
        part = self._start(final)
        dst = os.open(part, os.O_RDONLY)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            for i in frames.tolist():
                t0 = time.process_time()  # CPU time of drawing + encoding: the machine may be shared
                data = encode_jpeg(renderer.render(lat, i))
                self.render_s += time.process_time() - t0
                fd = os.open(self.names[i], flags, 0o644, dir_fd=dst)
                os.write(fd, data)
                os.close(fd)
        finally:
            os.close(dst)
        self.rendered += len(frames)
        os.replace(part, final)

    def link(self, final: Path, pool_id: int, pos: np.ndarray, frames: np.ndarray) -> None:
        part = self._start(final)
        src = os.open(self.pool / f"{pool_id:03d}", os.O_RDONLY)
        dst = os.open(part, os.O_RDONLY)
        try:  # dir fds: no path resolution per link — 2.9M links in well under a minute
            for i, k in zip(frames.tolist(), pos[frames].tolist(), strict=True):
                os.link(f"{k:04d}.jpg", self.names[i], src_dir_fd=src, dst_dir_fd=dst)
        finally:
            os.close(src)
            os.close(dst)
        self.linked += len(frames)
        os.replace(part, final)

    def render_pool(self, cfg: SynthConfig, lats: list[Latent]) -> None:
        """Render the full-scale face pool (clips already complete are kept)."""
        for p, lat in enumerate(tqdm(lats, desc="face pool", unit="id", leave=False)):
            d = self.pool / f"{p:03d}"
            if (d / f"{_POOL_FRAMES - 1:04d}.jpg").exists():
                continue
            renderer = FaceRenderer(np.random.default_rng([cfg.seed, 2**30 + p, 0]))
            d.mkdir(parents=True, exist_ok=True)
            for k in range(_POOL_FRAMES):
                t0 = time.process_time()
                data = encode_jpeg(renderer.render(lat, k))
                self.render_s += time.process_time() - t0
                _write_file(d / f"{k:04d}.jpg", data)
            self.rendered += _POOL_FRAMES


def _pool_latents(cfg: SynthConfig) -> list[Latent]:
    n = min(_POOL_IDS, cfg.videos)
    return [simulate(np.random.default_rng([cfg.seed, 2**30 + p, 1]), _POOL_FRAMES, _POOL_FRAMES / 5) for p in range(n)]


def _pool_walk(rng: np.random.Generator, n: int) -> np.ndarray:
    """Pool frame per video frame: back and forth through the pool clip, jumping every 400."""
    period = 2 * _POOL_FRAMES - 2
    phase = rng.integers(0, period, size=n // 400 + 1)
    u = (phase[np.arange(n) // 400] + np.arange(n)) % period
    return np.where(u < _POOL_FRAMES, u, period - u)


# --- truth and MTL --------------------------------------------------------------------------
