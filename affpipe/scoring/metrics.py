"""ABAW metrics: CCC for valence/arousal, macro F1 for expressions and action units, P_MTL.

The functions take numpy arrays or torch tensors and compute in float64 numpy, exactly as the
ABAW organisers do: Lin's CCC with population (``ddof=0``) variances, F1 per class with
``zero_division=0`` (a class absent from both prediction and target scores 0 and still counts
in the macro over all 8 classes, as ``sklearn.metrics.f1_score(labels=range(8),
average="macro", zero_division=0)``), binary F1 per AU over that AU's valid entries.

``MetricAccumulator`` collects a model's predictions batch by batch on the CPU (every row, with
each head's mask, so the same store serves metrics and prediction files), computes the metrics
at the end, tunes per-AU thresholds, and gathers the stores of all ranks under DDP.

(A little over 400 lines: the accumulator's tuning and its cross-validation over video folds
read the same stored arrays.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from affpipe.labels import AU_NAMES, EXPR_CLASSES, NUM_AU, NUM_EXPR, TASKS

log = logging.getLogger(__name__)

ArrayLike = Any  # np.ndarray | torch.Tensor | sequence

DEFAULT_THRESHOLD_GRID = np.linspace(0.05, 0.95, 19)


def _np(x: ArrayLike, dtype: Any = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def ccc(pred: ArrayLike, target: ArrayLike) -> float:
    """Lin's concordance correlation coefficient of two 1-d series (population variances).

    ``2 cov(x, y) / (var(x) + var(y) + (mean(x) - mean(y))^2)``. NaN for empty input; when the
    denominator is 0 (both series constant and equal) the agreement is perfect and 1.0 is
    returned.
    """
    x = _np(pred, np.float64).reshape(-1)
    y = _np(target, np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"ccc: pred has {x.size} values, target {y.size}")
    if x.size == 0:
        return float("nan")
    mx, my = x.mean(), y.mean()
    vx, vy = x.var(), y.var()
    cov = ((x - mx) * (y - my)).mean()
    den = vx + vy + (mx - my) ** 2
    if den == 0.0:
        return 1.0
    return float(2.0 * cov / den)


def va_ccc(pred: ArrayLike, target: ArrayLike) -> dict[str, float]:
    """CCC of valence (column 0) and arousal (column 1) and their mean, ``va_ccc``."""
    p, t = _np(pred, np.float64), _np(target, np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or p.shape != t.shape:
        raise ValueError(f"va_ccc: expected pred and target [N,2], got {p.shape} and {t.shape}")
    v, a = ccc(p[:, 0], t[:, 0]), ccc(p[:, 1], t[:, 1])
    return {"valence_ccc": v, "arousal_ccc": a, "va_ccc": (v + a) / 2.0}


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    # 2tp / (2tp + fp + fn) equals 2PR/(P+R) wherever that is defined; 0 elsewhere (zero_division=0).
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0).astype(np.float64)


def expr_f1(pred_labels: ArrayLike, target: ArrayLike) -> tuple[float, list[float]]:
    """Macro F1 over the 8 expression classes and the per-class F1 (classes in ``EXPR_CLASSES`` order)."""
    p = _np(pred_labels, np.int64).reshape(-1)
    t = _np(target, np.int64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"expr_f1: pred has {p.size} labels, target {t.size}")
    if ((t < 0) | (t >= NUM_EXPR)).any() or ((p < 0) | (p >= NUM_EXPR)).any():
        raise ValueError(f"expr_f1: labels must be in 0..{NUM_EXPR - 1} (mask invalid frames first)")
    tp = np.bincount(t[p == t], minlength=NUM_EXPR).astype(np.float64)
    fp = np.bincount(p, minlength=NUM_EXPR) - tp
    fn = np.bincount(t, minlength=NUM_EXPR) - tp
    per = _f1(tp, fp, fn)
    return float(per.mean()), per.tolist()


def au_f1(
    pred_binary: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None
) -> tuple[float, list[float]]:
    """Macro F1 over the AUs and the F1 per AU (binary, over the entries where ``mask`` is true).

    An AU is scored only on frames where it is annotated: an AU no stored frame annotates (ABAW1
    files have 7 of the 12) has F1 NaN and stays out of the macro mean (0.0 when none is annotated).
    """
    p = _np(pred_binary).astype(bool)
    t = _np(target)
    if p.ndim != 2 or p.shape[1] != NUM_AU or p.shape != t.shape:
        raise ValueError(f"au_f1: expected pred and target [N,{NUM_AU}], got {p.shape} and {t.shape}")
    m = np.ones(p.shape, bool) if mask is None else _np(mask).astype(bool)
    if m.shape != p.shape:
        raise ValueError(f"au_f1: mask shape {m.shape} != {p.shape}")
    t = (t > 0.5) & m
    p = p & m
    tp = (p & t).sum(0).astype(np.float64)
    fp = (p & ~t).sum(0).astype(np.float64)
    fn = (~p & t).sum(0).astype(np.float64)
    per = np.where(m.any(axis=0), _f1(tp, fp, fn), np.nan)
    scored = per[~np.isnan(per)]
    return (float(scored.mean()) if len(scored) else 0.0), per.tolist()


def p_mtl(va_ccc: float, expr_f1: float, au_f1: float) -> float:
    """The ABAW multi-task score: mean VA CCC + EXPR macro F1 + AU macro F1 (range [-1, 3])."""
    return float(va_ccc + expr_f1 + au_f1)


def _get(batch: Any, name: str) -> Any:
    return batch[name] if isinstance(batch, Mapping) else getattr(batch, name)


_FIELDS = {
    "va": ("va_pred", "va_target", "va_mask"),
    "expr": ("expr_pred", "expr_prob", "expr_target", "expr_mask"),
    "au": ("au_prob", "au_target", "au_mask"),
}


class MetricAccumulator:
    """Streaming store of predictions and labels for the given tasks, kept on the CPU.

    ``update(outputs, batch)`` takes the model's output dict (``va`` [N,2], ``expr`` [N,8]
    logits, ``au`` [N,12] logits) and a ``Batch`` (or a mapping with its fields). Every row is
    kept with its masks, so ``predictions()`` covers unlabelled frames too and ``compute()``
    scores only the valid labels of each head.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        tasks = tuple(tasks)
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise ValueError(f"MetricAccumulator: tasks must be a non-empty subset of {TASKS}, got {tasks}")
        self.tasks = tasks
        self.reset()

    def reset(self) -> None:
        """Forget everything stored."""
        self._chunks: dict[str, list[np.ndarray]] = {"row_id": []}
        for t in self.tasks:
            for f in _FIELDS[t]:
                self._chunks[f] = []
        self._cache: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(sum(len(c) for c in self._chunks["row_id"]))

    @torch.no_grad()
    def update(self, outputs: Mapping[str, torch.Tensor], batch: Any) -> None:
        """Store one batch's predictions (detached, on the CPU) with its labels and masks."""
        new: dict[str, torch.Tensor] = {"row_id": _get(batch, "row_id").reshape(-1).long()}
        n = new["row_id"].shape[0]
        if "va" in self.tasks:
            new["va_pred"] = outputs["va"].float()
            new["va_target"] = _get(batch, "va").float()
            new["va_mask"] = _get(batch, "va_mask").bool()
        if "expr" in self.tasks:
            logits = outputs["expr"].float()
            new["expr_prob"] = torch.softmax(logits, dim=1)
            new["expr_pred"] = logits.argmax(dim=1)
            new["expr_target"] = _get(batch, "expr").long()
            new["expr_mask"] = _get(batch, "expr_mask").bool()
        if "au" in self.tasks:
            new["au_prob"] = torch.sigmoid(outputs["au"].float())
            new["au_target"] = _get(batch, "au").float()
            new["au_mask"] = _get(batch, "au_mask").bool()
        for key, value in new.items():
            if value.shape[0] != n:
                raise ValueError(f"MetricAccumulator.update: {key} has {value.shape[0]} rows, row_id {n}")
            arr = value.detach().to("cpu").numpy()
            if key == "expr_target":
                arr = arr.astype(np.int8)
            elif key == "au_target":
                arr = arr.astype(np.int8)
            self._chunks[key].append(arr)
        self._cache = None

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._cache is None:
            self._cache = {}
            for key, chunks in self._chunks.items():
                if chunks:
                    self._cache[key] = np.concatenate(chunks)
                    self._chunks[key] = [self._cache[key]]
                else:
                    self._cache[key] = _empty(key)
        return self._cache

    @classmethod
    def from_state(cls, tasks: Sequence[str], arrays: Mapping[str, np.ndarray]) -> MetricAccumulator:
        """An accumulator holding ``arrays`` (a ``state()``, e.g. read back from a predictions file)."""
        out = cls(tasks)
        missing = [k for k in out._chunks if k not in arrays]
        if missing:
            raise ValueError(f"MetricAccumulator.from_state: missing {missing} for tasks {out.tasks}")
        out._chunks = {k: [np.asarray(arrays[k])] for k in out._chunks}
        return out

    def state(self) -> dict[str, np.ndarray]:
        """The stored arrays (row_id, per-task predictions, targets, masks)."""
        return dict(self._arrays())

    def nonfinite_rows(self) -> np.ndarray:
        """Boolean mask of the stored rows whose predictions hold a NaN or an infinity."""
        a = self._arrays()
        bad = np.zeros(len(a["row_id"]), bool)
        for key in ("va_pred", "expr_prob", "au_prob"):
            if key in a and len(a[key]):
                bad |= ~np.isfinite(a[key]).all(axis=1)
        return bad

    def with_predictions(self, **arrays: np.ndarray) -> MetricAccumulator:
        """A copy whose stored predictions (``va_pred``, ``expr_prob``, ``au_prob``) are replaced,
        e.g. by temporally smoothed ones; ``expr_pred`` follows a new ``expr_prob``."""
        bad = set(arrays) - {"va_pred", "expr_prob", "au_prob"}
        if bad:
            raise ValueError(f"with_predictions: only va_pred, expr_prob, au_prob can be replaced, got {sorted(bad)}")
        state = self.state()
        for key, value in arrays.items():
            if key in state and np.shape(value) != state[key].shape:
                raise ValueError(f"with_predictions: {key} must have shape {state[key].shape}, got {np.shape(value)}")
            state[key] = np.asarray(value, np.float32)
        if "expr_prob" in arrays and "expr_pred" in state:
            state["expr_pred"] = state["expr_prob"].argmax(1)
        out = MetricAccumulator(self.tasks)
        out._chunks = {k: [v] for k, v in state.items() if k in out._chunks}
        return out

    def _au_binary(self, au_thresholds: Sequence[float] | None) -> np.ndarray:
        a = self._arrays()
        thr = np.full(NUM_AU, 0.5) if au_thresholds is None else np.asarray(au_thresholds, np.float64)
        if thr.shape != (NUM_AU,):
            raise ValueError(f"au_thresholds must hold {NUM_AU} values, got {thr.shape}")
        return a["au_prob"] >= thr

    def compute(self, au_thresholds: Sequence[float] | None = None) -> dict[str, Any]:
        """Metrics over the stored valid labels.

        Keys (for the tasks present): ``va_ccc``, ``valence_ccc``, ``arousal_ccc``, ``n_va``;
        ``expr_f1``, ``expr_f1_per_class`` {class: f1}, ``n_expr``; ``au_f1``,
        ``au_f1_per_au`` {AU: f1}, ``n_au`` (rows with at least one valid AU); ``p_mtl`` when
        all three tasks are present. ``au_thresholds`` (12 values) default to 0.5.
        """
        a = self._arrays()
        out: dict[str, Any] = {}
        if "va" in self.tasks:
            m = a["va_mask"]
            out.update(va_ccc(a["va_pred"][m], a["va_target"][m]))
            out["n_va"] = int(m.sum())
        if "expr" in self.tasks:
            m = a["expr_mask"]
            f1, per = expr_f1(a["expr_pred"][m], a["expr_target"][m])
            out["expr_f1"] = f1
            out["expr_f1_per_class"] = dict(zip(EXPR_CLASSES, per, strict=True))
            out["n_expr"] = int(m.sum())
        if "au" in self.tasks:
            m = a["au_mask"]
            f1, per = au_f1(self._au_binary(au_thresholds), a["au_target"], m)
            out["au_f1"] = f1
            out["au_f1_per_au"] = dict(zip(AU_NAMES, per, strict=True))
            out["n_au"] = int(m.any(axis=1).sum())
        if all(t in self.tasks for t in TASKS):
            out["p_mtl"] = p_mtl(out["va_ccc"], out["expr_f1"], out["au_f1"])
        bad = int(self.nonfinite_rows().sum())
        for key in ("va_ccc", "expr_f1", "au_f1"):
            if key in out and isinstance(out[key], float) and math.isnan(out[key]):
                # NaN predictions, not missing labels, are the likelier cause when there are any
                why = f"{bad} of {len(self)} rows have non-finite predictions" if bad else "no valid labels were stored"
                log.warning("%s is NaN: %s", key, why)
        return out

    def tune_au_thresholds(self, grid: Sequence[float] = DEFAULT_THRESHOLD_GRID) -> list[float]:
        """Per-AU threshold from ``grid`` maximizing that AU's F1 on the stored valid entries.

        Ties go to the lowest threshold; an AU without valid entries keeps 0.5. Tune on
        validation data only when the score is then reported on other data (or say so).
        """
        if "au" not in self.tasks:
            raise ValueError("tune_au_thresholds: this accumulator has no 'au' task")
        a = self._arrays()
        grid = np.asarray(grid, np.float64).reshape(-1)
        prob, mask = a["au_prob"], a["au_mask"]
        target = (a["au_target"] > 0) & mask
        out: list[float] = []
        for j in range(NUM_AU):
            m = mask[:, j]
            if not m.any():
                out.append(0.5)
                continue
            p, t = prob[m, j], target[m, j]
            pred = p[None, :] >= grid[:, None]  # [G, n]
            tp = (pred & t).sum(1).astype(np.float64)
            fp = pred.sum(1) - tp
            fn = t.sum() - tp
            out.append(float(grid[int(np.argmax(_f1(tp, fp, fn)))]))
        return out

    def subset(self, rows: np.ndarray) -> MetricAccumulator:
        """A copy holding only ``rows`` (a boolean mask or indices into the stored rows)."""
        out = MetricAccumulator(self.tasks)
        out._chunks = {k: [v[rows]] for k, v in self._arrays().items() if k in out._chunks}
        return out

    def cross_validated_au(self, videos: ArrayLike, folds: int = 2, *, seed: int = 0,
                           grid: Sequence[float] = DEFAULT_THRESHOLD_GRID) -> dict[str, Any]:
        """AU F1 with thresholds tuned by cross-validation over videos: per fold, thresholds tuned
        on the other folds' videos binarize this fold's frames; the held-out predictions of all
        folds are scored together. ``au_f1``, ``au_f1_per_au``, ``p_mtl`` (when all heads are
        present), ``folds``, ``fold_thresholds`` and ``au_pred`` (the held-out 0/1 predictions)."""
        if "au" not in self.tasks:
            raise ValueError("cross_validated_au: this accumulator has no 'au' task")
        fold = video_folds(videos, folds, seed=seed, n_rows=len(self))
        a = self._arrays()
        pred = np.zeros(a["au_prob"].shape, bool)
        per_fold = []
        for k in range(folds):
            held = fold == k
            thr = np.asarray(self.subset(~held).tune_au_thresholds(grid))
            pred[held] = a["au_prob"][held] >= thr
            per_fold.append(thr.tolist())
        f1, per = au_f1(pred, a["au_target"], a["au_mask"])
        out: dict[str, Any] = {"au_f1": f1, "au_f1_per_au": dict(zip(AU_NAMES, per, strict=True)), "folds": folds,
                               "fold_thresholds": per_fold, "au_pred": pred}
        if all(t in self.tasks for t in TASKS):
            plain = self.compute()
            out["p_mtl"] = p_mtl(plain["va_ccc"], plain["expr_f1"], f1)
        return out

    def all_reduce(self, dedupe: bool = True) -> None:
        """Gather every rank's store onto every rank (no-op unless torch.distributed is initialized).

        Rows are then de-duplicated by ``row_id`` (a distributed reader may pad a rank's last
        batch with repeated samples), keeping the first copy.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._arrays())
        merged = {k: np.concatenate([g[k] for g in gathered]) for k in self._chunks}
        if dedupe:
            _, first = np.unique(merged["row_id"], return_index=True)
            if len(first) != len(merged["row_id"]):
                log.info("all_reduce: dropped %d duplicate rows", len(merged["row_id"]) - len(first))
            first.sort()
            merged = {k: v[first] for k, v in merged.items()}
        self._chunks = {k: [v] for k, v in merged.items()}
        self._cache = None

    def predictions(self, au_thresholds: Sequence[float] | None = None) -> dict[str, np.ndarray]:
        """Raw predictions of every stored row, for prediction files.

        ``row_id`` [N]; ``va`` [N,2] (valence, arousal); ``expr`` [N] (argmax) and ``expr_prob``
        [N,8]; ``au_prob`` [N,12] and ``au`` [N,12] (0/1 at ``au_thresholds``, default 0.5).
        """
        a = self._arrays()
        out = {"row_id": a["row_id"]}
        if "va" in self.tasks:
            out["va"] = a["va_pred"]
        if "expr" in self.tasks:
            out["expr"] = a["expr_pred"]
            out["expr_prob"] = a["expr_prob"]
        if "au" in self.tasks:
            out["au_prob"] = a["au_prob"]
            out["au"] = self._au_binary(au_thresholds).astype(np.int8)
        return out


def video_folds(videos: ArrayLike, folds: int, *, seed: int = 0, n_rows: int | None = None) -> np.ndarray:
    """The fold (0..folds-1) of each row: recordings are shuffled (seeded) and dealt round-robin, so
    every frame of a recording lands in the same fold and fold sizes differ by at most one recording."""
    video = np.asarray(videos)
    if n_rows is not None and len(video) != n_rows:
        raise ValueError(f"video_folds: {len(video)} videos given for {n_rows} rows")
    from affpipe.scoring.bootstrap import recording_of

    # The two subjects of a recording (_left/_right) share frames and scene: one fold, never split.
    names, codes = np.unique(recording_of(video), return_inverse=True)
    if not 2 <= folds <= len(names):
        raise ValueError(f"--tune-folds must be between 2 and the number of recordings ({len(names)}), got {folds}")
    order = np.random.default_rng([seed, 0xF01D]).permutation(len(names))
    fold_of = np.empty(len(names), np.int64)
    fold_of[order] = np.arange(len(names)) % folds
    return fold_of[codes.reshape(-1)]


def _empty(key: str) -> np.ndarray:
    shapes = {
        "row_id": ((0,), np.int64),
        "va_pred": ((0, 2), np.float32), "va_target": ((0, 2), np.float32), "va_mask": ((0,), bool),
        "expr_pred": ((0,), np.int64), "expr_prob": ((0, NUM_EXPR), np.float32),
        "expr_target": ((0,), np.int8), "expr_mask": ((0,), bool),
        "au_prob": ((0, NUM_AU), np.float32), "au_target": ((0, NUM_AU), np.int8),
        "au_mask": ((0, NUM_AU), bool),
    }
    shape, dtype = shapes[key]
    return np.zeros(shape, dtype)
