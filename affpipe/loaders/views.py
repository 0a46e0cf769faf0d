"""Augmented views for self-supervised pre-training: the usual SSL set, drawn from the epoch plan.

Each view of a frame is a random resized crop (area ``scale``, aspect ``ratio``, torchvision's
ten-tries rule) resized to ``size`` with a horizontal flip folded into the same affine warp, then
(each with its probability) a colour jitter (brightness, contrast, saturation, hue: in that
order), grayscale, a gaussian blur (sigma uniform in ``blur_sigma``) and solarization. The recipe
gives one :class:`ViewConfig` per view, so asymmetric views (BYOL's) are one config each.

Draws are a pure function of ``(epoch seed, batch, view)`` (:func:`draw_views`), like the
supervised flips and angles (``affpipe.loaders.augment``): a resumed run that starts at batch
``k`` sees the same views. The CPU path (:func:`render_view`) is OpenCV on uint8 (every call
releases the GIL, so the loader's threads run in parallel); the DALI path feeds the same draws to
``warp_affine``/``color_twist``/``gaussian_blur`` (``affpipe.loaders.dali_views``): the same crops
and flips, pixel values that differ by interpolation and colour-space rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

_TRIES = 10  # torchvision's RandomResizedCrop attempts before its centre-crop fallback


def _pair(value, name: str, lo: float, hi: float) -> tuple[float, float]:
    a, b = (float(v) for v in value)
    if not (lo <= a <= b <= hi):
        raise ValueError(f"views.{name} must be (low, high) with {lo} <= low <= high <= {hi}, got {value!r}")
    return a, b


@dataclass(frozen=True)
class ViewConfig:
    """One view's augmentation (defaults: SimSiam's, He et al. 2021 / MoCo v2 set, 112 px)."""

    size: int = 112
    scale: tuple[float, float] = (0.2, 1.0)  # crop area / image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # fraction of the hue circle, in [0, 0.5]
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels at 224 px, scaled by size / 224
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"views.size must be >= 8, got {self.size}")
        object.__setattr__(self, "scale", _pair(self.scale, "scale", 1e-4, 1.0))
        object.__setattr__(self, "ratio", _pair(self.ratio, "ratio", 1e-2, 1e2))
        object.__setattr__(self, "blur_sigma", _pair(self.blur_sigma, "blur_sigma", 1e-3, 50.0))
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"views.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"views.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"views.hue must be in [0, 0.5], got {self.hue}")

    @classmethod
    def from_dict(cls, d: dict) -> ViewConfig:
        """From a recipe's ``[[views]]`` table; an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"views: unknown key(s) {unknown} (known: {sorted(known)})")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class ViewParams:
    """One view's draws for a batch of ``n`` frames (all arrays ``[n]`` or ``[n, k]``)."""

    box: np.ndarray  # float64 [n, 4]: x0, y0, w, h of the crop in source pixels (corner convention)
    flip: np.ndarray  # bool
    jitter: np.ndarray  # float64 [n, 4]: brightness, contrast, saturation factors, hue shift (1, 1, 1, 0: none)
    gray: np.ndarray  # bool
    sigma: np.ndarray  # float64, 0: no blur
    solarize: np.ndarray  # bool


def _crop_boxes(rng: np.random.Generator, n: int, height: int, width: int, cfg: ViewConfig) -> np.ndarray:
    """torchvision's ``RandomResizedCrop.get_params``, vectorized: ten tries of (area, log-ratio),
    the first that fits; else the whole image clamped to the ratio range, centred."""
    area = height * width
    target = area * rng.uniform(cfg.scale[0], cfg.scale[1], (n, _TRIES))
    log_r = np.log(cfg.ratio)
    aspect = np.exp(rng.uniform(log_r[0], log_r[1], (n, _TRIES)))
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = np.argmax(fits, axis=1)
    ok = fits[np.arange(n), first]
    w, h = w[np.arange(n), first], h[np.arange(n), first]
    u = rng.random((n, 2))  # torchvision draws integer offsets in [0, side - crop]
    x0 = np.floor(u[:, 0] * (width - w + 1))
    y0 = np.floor(u[:, 1] * (height - h + 1))
    if not ok.all():
        in_ratio = width / height
        fw, fh = (float(width), float(height))
        if in_ratio < cfg.ratio[0]:
            fh = round(width / cfg.ratio[0])
        elif in_ratio > cfg.ratio[1]:
            fw = round(height * cfg.ratio[1])
        w, h = np.where(ok, w, fw), np.where(ok, h, fh)
        x0 = np.where(ok, x0, (width - fw) // 2)
        y0 = np.where(ok, y0, (height - fh) // 2)
    return np.stack([x0, y0, w, h], 1).astype(np.float64)


def draw_view(rng: np.random.Generator, n: int, src: tuple[int, int], cfg: ViewConfig) -> ViewParams:
    """One view's draws for ``n`` frames of ``src`` = (height, width)."""
    box = _crop_boxes(rng, n, src[0], src[1], cfg)
    flip = rng.random(n) < cfg.flip_p
    jit = rng.random(n) < cfg.jitter_p
    factors = np.stack([rng.uniform(1 - cfg.brightness, 1 + cfg.brightness, n),
                        rng.uniform(1 - cfg.contrast, 1 + cfg.contrast, n),
                        rng.uniform(1 - cfg.saturation, 1 + cfg.saturation, n),
                        rng.uniform(-cfg.hue, cfg.hue, n)], 1)
    jitter = np.where(jit[:, None], factors, np.array([1.0, 1.0, 1.0, 0.0]))
    gray = rng.random(n) < cfg.grayscale_p
    blur = rng.random(n) < cfg.blur_p
    sigma = np.where(blur, rng.uniform(cfg.blur_sigma[0], cfg.blur_sigma[1], n) * cfg.size / 224.0, 0.0)
    solarize = rng.random(n) < cfg.solarize_p
    return ViewParams(box, flip, jitter, gray, sigma, solarize)


def draw_views(seed: int, batch: int, n: int, src: tuple[int, int], views: tuple[ViewConfig, ...]) -> list[ViewParams]:
    """Every view's draws for batch ``batch`` of an epoch whose plan seed is ``seed``: a pure
    function of those, so batch ``k`` of a resumed run gets the same views."""
    return [draw_view(np.random.default_rng([seed, batch, 0x5517, v]), n, src, cfg) for v, cfg in enumerate(views)]


_SOLARIZE = np.where(np.arange(256) < 128, np.arange(256), 255 - np.arange(256)).astype(np.uint8)
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, what torchvision's rgb_to_grayscale uses
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_CONTRAST_CENTRE = 128.0  # DALI's contrast_center: the same on both backends (torchvision: the image mean)


def color_matrices(p: ViewParams) -> np.ndarray:
    """``[n, 3, 4]`` affine RGB transforms (``dst = A·rgb + t``) of each sample's colour jitter
    (brightness, contrast about mid-grey, saturation, hue as a YIQ rotation) and grayscale:
    one ``cv2.transform`` on a CPU, one ``coord_transform`` in DALI (clipped once, at the end,
    where torchvision clips after every step)."""
    b, c, s, h = p.jitter.T
    n = len(b)
    eye = np.broadcast_to(np.eye(3), (n, 3, 3))
    grey = np.broadcast_to(np.outer(np.ones(3), _LUMA), (n, 3, 3))
    sat = s[:, None, None] * eye + (1 - s)[:, None, None] * grey
    th = 2 * np.pi * h
    rot = np.zeros((n, 3, 3))
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = np.cos(th), -np.sin(th), np.sin(th), np.cos(th)
    hue = np.linalg.inv(_YIQ) @ rot @ _YIQ
    a = hue @ sat * (b * c)[:, None, None]
    a = np.where(p.gray[:, None, None], grey @ a, a)
    t = np.repeat((_CONTRAST_CENTRE * (1 - c))[:, None], 3, axis=1)  # grey, hue and saturation keep grey
    return np.concatenate([a, t[:, :, None]], axis=2)


def render_view(image: np.ndarray, p: ViewParams, k: int, color: np.ndarray, out: np.ndarray) -> None:
    """Sample ``k``'s view of ``image`` (uint8 HWC RGB) into ``out`` (uint8 ``size``² x 3):
    crop (integer box) → linear resize → flip → colour (``color``: ``color_matrices(p)[k]``,
    skipped when it is the identity) → blur → solarize. OpenCV only: each call releases the GIL."""
    import cv2

    size = out.shape[0]
    x0, y0, w, h = (int(v) for v in p.box[k])
    crop = image[y0:y0 + h, x0:x0 + w]
    shrink = w > size or h > size
    img = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if p.flip[k]:
        img = cv2.flip(img, 1)
    if p.gray[k] or p.jitter[k, 0] != 1 or p.jitter[k, 1] != 1 or p.jitter[k, 2] != 1 or p.jitter[k, 3] != 0:
        img = cv2.transform(img, color)
    if p.sigma[k] > 0:
        img = cv2.GaussianBlur(img, (0, 0), float(p.sigma[k]), borderType=cv2.BORDER_REFLECT_101)
    if p.solarize[k]:
        img = cv2.LUT(img, _SOLARIZE)
    out[...] = img


def view_size(views: tuple[ViewConfig, ...]) -> int:
    """The one output size of every view (the batch tensors are stacked per view)."""
    sizes = {v.size for v in views}
    if len(sizes) != 1:
        raise ValueError(f"every view must have the same size (multi-crop is not supported), got {sorted(sizes)}")
    return sizes.pop()


__all__ = ["ViewConfig", "ViewParams", "color_matrices", "draw_view", "draw_views", "render_view", "view_size"]

