"""The face model of the synthetic Aff-Wild2 twin: per-frame latent state → labels → pixels.

A video is simulated as a sequence of expression segments (FACS-style AU prototypes with an
onset/apex/offset envelope), spontaneous AU bursts (talking, squinting, ...), and valence /
arousal that follow the expression through a smooth AR-like filter. Labels are read off that
latent state (an AU is on when its intensity passes 0.5); the face is drawn from the same
continuous intensities, so a network can learn every task from the pixels, with the
ambiguity near the threshold that real annotations have. Identity (face shape, skin tone,
hair, glasses, background), pose jitter, lighting, blur and sensor noise vary per video and
per frame so that no single pixel gives a label away.

Drawing uses cv2 primitives with sub-pixel coordinates (``shift=4``) on the final 112x112
canvas, so sub-pixel feature motion becomes anti-aliased intensity changes; the static
layers (background, hair, ears, shoulders, noise tiles) are drawn once per video.

(Slightly over 400 lines on purpose: the simulation and the renderer share the latent AU
layout and are only understood together.)
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from affpipe.labels import AU_NAMES, NUM_AU, NUM_EXPR

SIZE = 112
JPEG_QUALITY = 90
# Latent channels: the 12 labelled AUs, then three that are drawn but never labelled
# (AU5 upper lid raiser, AU9 nose wrinkler, AU20 lip stretcher) — they carry expression
# information the labelled AUs do not, as in real faces.
LATENT_AUS: tuple[str, ...] = (*AU_NAMES, "AU5", "AU9", "AU20")
_I = {name: i for i, name in enumerate(LATENT_AUS)}
NUM_LATENT = len(LATENT_AUS)

# Share of frames per class (Aff-Wild2-like: Fear, Disgust, Anger 2-3% each).
EXPR_PRIOR = np.array([0.30, 0.025, 0.02, 0.02, 0.17, 0.12, 0.06, 0.285])
_PROTO = {
    1: {"AU4": 1.0, "AU7": 0.9, "AU23": 0.85, "AU24": 0.75, "AU5": 0.3},  # Anger
    2: {"AU9": 1.0, "AU10": 1.0, "AU4": 0.45, "AU15": 0.35, "AU25": 0.4},  # Disgust
    3: {"AU1": 0.9, "AU2": 0.85, "AU4": 0.75, "AU5": 0.95, "AU20": 1.0, "AU25": 0.75},  # Fear
    4: {"AU6": 0.95, "AU12": 1.0, "AU25": 0.55},  # Happiness
    5: {"AU1": 0.9, "AU4": 0.8, "AU15": 0.95},  # Sadness
    6: {"AU1": 1.0, "AU2": 1.0, "AU5": 0.9, "AU25": 0.95, "AU26": 0.9},  # Surprise
}
PROTOTYPES = np.zeros((NUM_EXPR, NUM_LATENT), np.float32)
for _c, _aus in _PROTO.items():
    for _name, _v in _aus.items():
        PROTOTYPES[_c, _I[_name]] = _v
# (valence, arousal) at the apex of each class.
EXPR_VA = np.array([[0.0, -0.05], [-0.6, 0.6], [-0.6, 0.3], [-0.5, 0.7], [0.65, 0.35],
                    [-0.55, -0.35], [0.25, 0.75], [0.0, 0.2]], np.float32)
# Spontaneous activation share per AU (talking → AU25, squinting → AU7, ...).
SPONT_RATE = np.array([0.07, 0.03, 0.08, 0.08, 0.25, 0.2, 0.06, 0.02, 0.02, 0.02, 0.45, 0.06,
                       0.05, 0.02, 0.02], np.float32)


@dataclass
class Latent:
    """Per-frame latent state of one simulated video (``n`` frames)."""

    expr: np.ndarray  # int8 [n], class 0..7
    aus: np.ndarray  # float32 [n, NUM_LATENT], intensities 0..1
    va: np.ndarray  # float32 [n, 2], in [-1, 1], on the 1/1000 grid the files are written with
    pose: np.ndarray  # float32 [n, 4]: angle (deg), scale, tx, ty (px)
    light: np.ndarray  # float32 [n, 2]: gain, bias
    noise: np.ndarray  # int16 [n], noise tile per frame
    blur: np.ndarray  # bool [n]

    @property
    def au_labels(self) -> np.ndarray:
        """int8 [n, 12]: a labelled AU is on when its intensity passes 0.5."""
        return (self.aus[:, :NUM_AU] > 0.5).astype(np.int8)

    def take(self, idx: np.ndarray) -> Latent:
        """The latent state of frames ``idx`` (used to walk a pool video at full scale)."""
        return Latent(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def smooth(x: np.ndarray, tau: float) -> np.ndarray:
    """Causal exponential smoothing along axis 0 (an AR(1) filter), edge-padded at the start."""
    if tau <= 0.5:
        return x.astype(np.float32)
    k = np.exp(-np.arange(int(5 * tau) + 1) / tau)
    k /= k.sum()
    x2 = x.reshape(len(x), -1).astype(np.float64)
    pad = np.concatenate([np.repeat(x2[:1], len(k) - 1, 0), x2], 0)
    out = np.stack([np.convolve(pad[:, j], k, mode="valid") for j in range(x2.shape[1])], 1)
    return out.reshape(x.shape).astype(np.float32)


def _runs(rng: np.random.Generator, n: int, mean_len: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Geometric run lengths covering ``n`` frames: (run id per frame, run lengths)."""
    p = 1.0 / max(mean_len, 1.0)
    lens = rng.geometric(p, size=size)
    while lens.sum() < n:
        lens = np.concatenate([lens, rng.geometric(p, size=size)])
    ids = np.repeat(np.arange(len(lens)), lens)[:n]
    return ids, lens


def run_mask(rng: np.random.Generator, n: int, share: float, mean_len: float) -> np.ndarray:
    """bool [n]: alternating off/on runs, ``share`` of frames on in runs of ``mean_len``."""
    if share <= 0 or n == 0:
        return np.zeros(n, bool)
    m_on = max(mean_len, 1.0)
    m_off = m_on * (1.0 - share) / share
    k = int(n / (m_on + m_off) * 2) + 4
    on = rng.geometric(1.0 / m_on, size=k)
    off = rng.geometric(1.0 / max(m_off, 1.0), size=k)
    first_on = rng.random() < share
    lens = np.stack([on, off] if first_on else [off, on], 1).reshape(-1)
    state = np.tile(np.array([first_on, not first_on]), k)
    mask = np.repeat(state, lens)
    if len(mask) < n:  # rare: runs drawn did not cover n frames
        mask = np.concatenate([mask, np.zeros(n - len(mask), bool)])
    return mask[:n]


def simulate(rng: np.random.Generator, n: int, seg_mean: float) -> Latent:
    """Simulate ``n`` frames of one video; ``seg_mean`` is the mean expression segment length."""
    probs = rng.dirichlet(EXPR_PRIOR * 40.0)
    seg, lens = _runs(rng, n, seg_mean, int(n / seg_mean) + 8)
    nseg = len(lens)
    cls = rng.choice(NUM_EXPR, size=nseg, p=probs)
    proto = PROTOTYPES[cls] * rng.uniform(0.75, 1.15, size=(nseg, NUM_LATENT)).astype(np.float32)
    other = np.flatnonzero(cls == 7)  # "Other": a random pair of AUs per segment
    for s in other:
        proto[s, rng.choice(NUM_AU, size=2, replace=False)] = rng.uniform(0.5, 1.0, 2)
    apex = rng.uniform(0.55, 1.0, size=nseg)
    start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    pos = np.arange(n) - start[seg]
    ramp = np.maximum(1.0, 0.25 * lens[seg])
    env01 = np.clip(np.minimum((pos + 1) / ramp, (lens[seg] - pos) / ramp), 0.0, 1.0)
    env = (apex[seg] * env01).astype(np.float32)
    expr_part = proto[seg] * env[:, None]

    spont = np.zeros((n, NUM_LATENT), np.float32)
    m_on = max(2.0, 0.5 * seg_mean)
    for k in range(NUM_LATENT):
        on = run_mask(rng, n, float(SPONT_RATE[k]), m_on)
        ids = np.cumsum(np.diff(on.astype(np.int8), prepend=0) != 0)
        level = rng.uniform(0.3, 1.0, size=ids.max() + 1 if n else 1).astype(np.float32)
        spont[:, k] = on * level[ids]
    spont = smooth(spont, 1.5)
    jitter = smooth(rng.normal(0.0, 0.12, size=(n, NUM_LATENT)), 2.0)
    aus = np.clip(np.maximum(expr_part, spont) + jitter, 0.0, 1.0).astype(np.float32)

    mood = rng.normal(0.0, 0.15, size=2)
    seg_off = rng.normal(0.0, 0.12, size=(nseg, 2))
    target = mood + EXPR_VA[cls[seg]] * (0.35 + 0.65 * env01[:, None]) + seg_off[seg]
    tau = max(1.0, seg_mean / 4.0)
    a = np.exp(-1.0 / tau)
    noise = smooth(rng.normal(0.0, 0.07, size=(n, 2)), tau) * np.sqrt((1 + a) / (1 - a))
    va = np.clip(smooth(target, tau) + noise, -1.0, 1.0)
    va = (np.round(va * 1000.0) / 1000.0).astype(np.float32)

    pose = np.empty((n, 4), np.float32)
    base = rng.normal(0.0, [2.5, 0.02, 1.2, 1.2])
    pose[:] = base + smooth(rng.normal(0.0, [3.0, 0.025, 1.3, 1.3], size=(n, 4)), 2.0) * 2.0
    light = np.empty((n, 2), np.float32)
    light[:] = rng.uniform([0.75, -18.0], [1.15, 18.0]) + smooth(rng.normal(0.0, [0.05, 5.0], size=(n, 2)), 3.0) * 2.0
    return Latent(
        expr=cls[seg].astype(np.int8), aus=aus, va=va, pose=pose, light=light,
        noise=rng.integers(0, _NOISE_TILES, size=n).astype(np.int16), blur=rng.random(n) < 0.15,
    )


# --- drawing --------------------------------------------------------------------------------

_NOISE_TILES = 6
_F = 16.0  # cv2 sub-pixel factor for shift=4
_AA = cv2.LINE_AA


def _c(color: np.ndarray | tuple, k: float = 1.0) -> tuple[float, float, float]:
    return (float(color[0]) * k, float(color[1]) * k, float(color[2]) * k)


def _mix(a: np.ndarray, b: np.ndarray, t: float) -> tuple[float, float, float]:
    t = min(max(t, 0.0), 1.0)
    return _c(a * (1.0 - t) + b * t)


class FaceRenderer:
    """Draws one identity's face for given latent intensities; static layers built once.

    The head pose is applied to the drawing coordinates (every point goes through one affine
    map) instead of warping the finished image: a 112 px ``warpAffine`` costs about as much as
    drawing the whole face.
    """

    def __init__(self, rng: np.random.Generator):
        r = rng
        t = r.random()
        self.skin = (np.array([190.0, 205.0, 235.0]) * (1 - t) + np.array([55.0, 80.0, 120.0]) * t
                     + r.normal(0, 8, 3)).clip(20, 250)
        self.shadow = self.skin * 0.72
        self.lip = np.array([self.skin[0] * 0.62, self.skin[1] * 0.58, min(250.0, self.skin[2] * 0.95)])
        self.rosy = np.array([self.skin[0] * 0.8, self.skin[1] * 0.78, min(255.0, self.skin[2] * 1.08)])
        hair = [(20, 20, 25), (25, 40, 65), (60, 110, 160), (150, 150, 155), (30, 55, 120), (40, 30, 30)]
        self.hair = np.array(hair[r.integers(len(hair))], float) + r.normal(0, 6, 3)
        iris = [(30, 45, 70), (120, 90, 50), (70, 110, 70), (40, 30, 25)]
        self.iris = np.array(iris[r.integers(len(iris))], float)
        self.cx, self.cy = 56 + r.normal(0, 1.0), 58 + r.normal(0, 1.5)
        self.fw, self.fh = r.uniform(31, 37), r.uniform(40, 46)
        self.eye_y = self.cy + r.uniform(-10, -7)
        self.eye_sep, self.eye_w, self.eye_h = r.uniform(12, 15), r.uniform(5.5, 7), r.uniform(2.6, 3.4)
        self.brow_gap, self.brow_len = r.uniform(6.5, 8.5), r.uniform(9, 12)
        self.brow_th = int(r.integers(2, 4))
        self.nose_len, self.nose_w = r.uniform(12, 15), r.uniform(4, 6)
        self.mouth_y = self.cy + r.uniform(18, 21)
        self.mouth_w, self.lip_u, self.lip_l = r.uniform(9.5, 12.5), r.uniform(1.8, 2.8), r.uniform(2.3, 3.3)
        self.glasses = r.random() < 0.1
        self.gray = r.random() < 0.06
        self.bald = r.random() < 0.08
        self.base = self._static_layer(r)
        shade = np.linspace(-1, 1, SIZE)
        ang = r.uniform(0, 2 * np.pi)
        grad = np.cos(ang) * shade[None, :] + np.sin(ang) * shade[:, None]
        self.shade = np.repeat((128 + r.uniform(10, 45) * grad)[..., None], 3, 2).clip(0, 255).astype(np.uint8)
        noise = r.standard_normal(size=(_NOISE_TILES, SIZE, SIZE, 3), dtype=np.float32) * r.uniform(2.0, 7.0)
        self.noise_pos = np.clip(noise, 0, 255).astype(np.uint8)
        self.noise_neg = np.clip(-noise, 0, 255).astype(np.uint8)
        self._set_pose(0.0, 0.0, 0.0, 0.0)

    def _static_layer(self, r: np.random.Generator) -> np.ndarray:
        img = np.empty((SIZE, SIZE, 3), np.uint8)
        c0, c1 = r.uniform(30, 230, 3), r.uniform(30, 230, 3)
        ramp = np.linspace(0, 1, SIZE)[:, None, None]
        img[:] = (c0 * (1 - ramp) + c1 * ramp).astype(np.uint8)
        for _ in range(int(r.integers(3, 7))):  # out-of-focus clutter
            x, y = (int(v) for v in r.integers(0, SIZE, 2))
            col = _c(r.uniform(20, 235, 3))
            if r.random() < 0.5:
                cv2.rectangle(img, (x, y), (x + int(r.integers(10, 50)), y + int(r.integers(10, 50))), col, -1)
            else:
                cv2.circle(img, (x, y), int(r.integers(5, 25)), col, -1)
        img = cv2.GaussianBlur(img, (0, 0), 2.5)
        cloth = _c(r.uniform(20, 220, 3))
        cv2.ellipse(img, (int(self.cx), int(self.cy + self.fh + 30)), (int(self.fw + 22), 32), 0, 0, 360, cloth, -1, _AA)
        cv2.rectangle(img, (int(self.cx - self.fw * 0.45), int(self.cy + 20)),
                      (int(self.cx + self.fw * 0.45), int(self.cy + self.fh + 6)), _c(self.shadow), -1)
        return img

    # -- posed primitives: every coordinate goes through the pose's affine map --
    def _set_pose(self, angle: float, scale: float, tx: float, ty: float) -> None:
        th = np.deg2rad(angle)
        s = 1.0 + scale
        a, b = s * np.cos(th), -s * np.sin(th)
        ox, oy = self.cx, self.cy + 4
        self._m = (a, b, ox - a * ox + (s * np.sin(th)) * oy + tx, -b, a, oy - (-b) * ox - a * oy + ty)
        self._mat = np.array([[a, b], [-b, a]]).T * _F
        self._off = np.array([self._m[2], self._m[5]]) * _F + 0.5
        self._s, self._deg = s * _F, angle

    def _p(self, x: float, y: float) -> tuple[int, int]:
        a, b, c, d, e, f = self._m
        return int((a * x + b * y + c) * _F + 0.5), int((d * x + e * y + f) * _F + 0.5)

    def _pts(self, pts: np.ndarray) -> np.ndarray:
        return (pts @ self._mat + self._off).astype(np.int32)

    def _ell(self, img, x, y, ax, ay, a0, a1, color, th=-1) -> None:
        cv2.ellipse(img, self._p(x, y), (int(ax * self._s + 0.5), int(ay * self._s + 0.5)), self._deg,
                    a0, a1, color, th, _AA, 4)

    def _line(self, img, x0, y0, x1, y1, color, th=1) -> None:
        cv2.line(img, self._p(x0, y0), self._p(x1, y1), color, th, _AA, 4)

    def draw(self, au: np.ndarray, va: np.ndarray) -> np.ndarray:
        """The face (posed by the last ``_set_pose``) for intensities ``au`` [NUM_LATENT], ``va`` [2]."""
        (au1, au2, au4, au6, au7, au10, au12, au15, au23, au24, au25, au26,
         au5, au9, au20) = au.tolist()
        val, aro = va.tolist()
        img = self.base.copy()
        self._head(img, au6, au12, au26)
        self._brows(img, au1, au2, au4, au5, aro)
        self._eyes(img, au5, au6, au7, aro)
        ny = self._nose(img, au9, au10)
        self._mouth(img, au10, au12, au15, au23, au24, au25, au26, au20, au9, val, ny)
        return img

    def _head(self, img, au6, au12, au26) -> None:
        """Hair, ears, face (the jaw drops with AU26), fringe, cheeks (AU6 raises and flushes)."""
        cx, cy, fw, fh = self.cx, self.cy, self.fw, self.fh
        ey, es = self.eye_y, self.eye_sep
        skin = _c(self.skin)
        if not self.bald:
            self._ell(img, cx, cy - 6, fw + 5, fh + 2, 0, 360, _c(self.hair))
        for s in (-1, 1):
            self._ell(img, cx + s * fw, ey + 6, 3.5, 7, 0, 360, _c(self.skin, 0.9))
        self._ell(img, cx, cy, fw, fh, 180, 360, skin)
        self._ell(img, cx, cy, fw, fh + 4.5 * au26, 0, 180, skin)
        if not self.bald:  # fringe
            self._ell(img, cx, cy - fh * 0.62, fw + 1, fh * 0.42, 180, 360, _c(self.hair))
        # cheeks rise and flush with AU6 (and a little with AU12)
        cheek = _mix(self.skin, self.rosy, 0.15 + 0.6 * au6)
        for s in (-1, 1):
            self._ell(img, cx + s * (es + 2), ey + 10 - 4.5 * au6 - 1.0 * au12, 6, 4, 0, 360, cheek)

    def _brows(self, img, au1, au2, au4, au5, aro) -> None:
        """Forehead wrinkles (AU1 middle, AU2 sides), brows (AU1 inner, AU2 outer, AU4 down and
        together), glabella furrows (AU4)."""
        cx, ey, es = self.cx, self.eye_y, self.eye_sep
        brow_y = ey - self.brow_gap - 1.5 * max(aro, 0.0) - 1.0 * au5
        if au1 > 0.2:
            col = _mix(self.skin, self.shadow, 0.9 * au1)
            for k in range(2):
                self._ell(img, cx, brow_y - 4 - 3 * k, 7, 1.5, 190, 350, col, 1)
        if au2 > 0.2:
            col = _mix(self.skin, self.shadow, 0.9 * au2)
            for s in (-1, 1):
                self._line(img, cx + s * 9, brow_y - 5, cx + s * 17, brow_y - 3, col)
        brows = []
        for s in (-1, 1):
            ix = cx + s * (es - self.brow_len * 0.55 - 1.8 * au4)
            ox = cx + s * (es + self.brow_len * 0.6)
            iy = brow_y - 4.0 * au1 + 3.2 * au4
            oy = brow_y - 4.0 * au2 + 0.8 * au4
            my = 0.5 * (iy + oy) - 1.3 - 0.8 * (au1 + au2)
            brows.append(self._pts(np.array([[ix, iy], [0.5 * (ix + ox), my], [ox, oy]])))
        cv2.polylines(img, brows, False, _c(self.hair, 0.8), self.brow_th, _AA, 4)
        if au4 > 0.2:  # glabella furrows
            col = _mix(self.skin, self.shadow, 1.2 * au4)
            for s in (-1, 1):
                self._line(img, cx + s * 1.8, brow_y + 1, cx + s * 1.4, brow_y + 5, col)

    def _eyes(self, img, au5, au6, au7, aro) -> None:
        """Eyes: AU5/arousal open them, AU7 (lower lid) and AU6 (cheek) narrow them; crow's feet."""
        cx, ey, es = self.cx, self.eye_y, self.eye_sep
        open_h = self.eye_h * (1 + 0.6 * au5 + 0.25 * max(aro, 0.0) - 0.55 * au7 - 0.35 * au6)
        open_h = min(max(open_h, 0.5), 6.0)
        ecy = ey - 0.8 * au7 - 0.6 * au6
        lid = _c(self.hair, 0.5)
        for s in (-1, 1):
            ex = cx + s * es
            self._ell(img, ex, ecy, self.eye_w, open_h, 0, 360, (235, 238, 240))
            self._ell(img, ex, ecy, 2.6, min(2.6, open_h), 0, 360, _c(self.iris))
            self._ell(img, ex, ecy, self.eye_w, open_h, 180, 360, lid, 1)
            if au7 > 0.15:
                self._ell(img, ex, ecy, self.eye_w, open_h, 10, 170, _mix(self.skin, self.shadow, 1.3 * au7), 1 + int(au7 > 0.5))
            if au6 > 0.25:  # crow's feet
                col = _mix(self.skin, self.shadow, au6)
                x0 = ex + s * (self.eye_w + 1.5)
                self._line(img, x0, ecy, x0 + s * 3, ecy - 1.5, col)
                self._line(img, x0, ecy + 1.5, x0 + s * 3, ecy + 3, col)
            if self.glasses:
                cv2.polylines(img, [self._pts(np.array([[ex - 8, ey - 5], [ex + 8, ey - 5], [ex + 8, ey + 5],
                                                        [ex - 8, ey + 5]]))], True, (30, 30, 30), 1, _AA, 4)

    def _nose(self, img, au9, au10) -> float:
        """The nose; AU9 wrinkles its bridge and lifts the nostrils, AU10 a little. Returns the
        nostrils' height (the mouth hangs below it)."""
        cx, ey = self.cx, self.eye_y
        ny = ey + self.nose_len - 1.2 * au9 - 0.8 * au10
        self._line(img, cx - 1.5, ey + 2, cx - 2.2, ny - 2, _c(self.shadow))
        for s in (-1, 1):
            self._ell(img, cx + s * self.nose_w * 0.55, ny, 1.8, 1.1, 0, 360, _c(self.shadow, 0.6))
        if au9 > 0.2:
            col = _mix(self.skin, self.shadow, 1.2 * au9)
            for k in range(2):
                self._line(img, cx - 3, ey + 2 + 2.2 * k, cx + 3, ey + 2 + 2.2 * k, col)
        return ny

    def _mouth(self, img, au10, au12, au15, au23, au24, au25, au26, au20, au9, val, ny) -> None:
        cx, my = self.cx, self.mouth_y
        hw = self.mouth_w * (1 + 0.22 * au12 + 0.25 * au20 - 0.18 * au23 - 0.08 * au24)
        corner = my - 4.0 * au12 + 4.5 * au15 - 1.8 * val
        gap = (3.2 * au25 + 5.5 * au26) * (1 - 0.8 * au24)
        ul_bot = my - 0.5 * gap - 2.2 * au10
        ul_top = ul_bot - self.lip_u * (1 - 0.45 * au23 - 0.45 * au24) - 0.8 * au10
        ll_top = my + 0.5 * gap + 2.5 * au26
        ll_bot = ll_top + self.lip_l * (1 - 0.45 * au23 - 0.45 * au24)
        x = cx + hw * _XS

        def curve(yc: float, rev: bool = False) -> np.ndarray:
            pts = np.stack([x, corner + (yc - corner) * _PROF], 1)
            return self._pts(pts[::-1] if rev else pts)

        fold = max(au10, 0.6 * au12, 0.5 * au9)
        if fold > 0.1:  # nasolabial folds
            col = _mix(self.skin, self.shadow, 0.2 + 0.9 * fold)
            for s in (-1, 1):
                self._line(img, cx + s * (self.nose_w + 1.5), ny, cx + s * (hw + 2.5), corner + 1.0, col)
        if gap > 0.4:
            cv2.fillPoly(img, [np.concatenate([curve(ul_bot), curve(ll_top, rev=True)])], (45, 30, 60), _AA, 4)
            if gap > 1.2 and (au10 > 0.3 or au12 > 0.3 or au20 > 0.3):  # teeth show
                th = min(0.45 * gap, 2.5)
                teeth = np.concatenate([curve(ul_bot)[1:-1], curve(ul_bot + th, rev=True)[1:-1]])
                cv2.fillPoly(img, [teeth], (225, 232, 235), _AA, 4)
        upper = np.concatenate([curve(ul_top), curve(ul_bot, rev=True)])
        lower = np.concatenate([curve(ll_top), curve(ll_bot, rev=True)])
        cv2.fillPoly(img, [upper, lower], _c(self.lip, 1.0 - 0.15 * au23), _AA, 4)
        cv2.polylines(img, [curve(0.5 * (ul_bot + ll_top))], False, _c(self.lip, 0.55 - 0.25 * au24),
                      1 + int(au24 > 0.5), _AA, 4)
        self._ell(img, cx, ll_bot + 4 + 1.5 * au26, 4, 1, 0, 180, _c(self.shadow, 1.05), 1)

    def render(self, latent: Latent, i: int) -> np.ndarray:
        """Frame ``i`` of ``latent`` with pose, lighting, blur and noise: uint8 [112,112,3] BGR."""
        self._set_pose(*latent.pose[i].tolist())
        img = self.draw(latent.aus[i], latent.va[i])
        img = cv2.multiply(img, self.shade, scale=1 / 128)
        gain, bias = latent.light[i].tolist()
        img = cv2.convertScaleAbs(img, alpha=gain, beta=bias)
        if latent.blur[i]:
            img = cv2.GaussianBlur(img, (3, 3), 0.8)
        k = int(latent.noise[i])
        img = cv2.subtract(cv2.add(img, self.noise_pos[k]), self.noise_neg[k])
        if self.gray:
            img = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
        return img


_XS = np.array([-1.0, -0.7, -0.35, 0.0, 0.35, 0.7, 1.0])
_PROF = 1.0 - _XS * _XS


def encode_jpeg(img: np.ndarray) -> bytes:
    """JPEG bytes (quality 90, like the cropped_aligned frames)."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    return buf.tobytes()
