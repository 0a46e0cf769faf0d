"""Builders shared by several test modules (``tests/`` is on ``sys.path``: see pyproject.toml)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from affpipe.labels import AU_NAMES, EXPR_CLASSES, FRAMES_SCHEMA

TASK_KEYS = {"va": ("va_ccc", "valence_ccc", "arousal_ccc"), "expr": ("expr_f1",), "au": ("au_f1",)}


def fake_run(root: Path, name: str, task: str, *, init: str = "random", va_loss: str = "ccc",
             weighted: bool = True, weighting: str = "fixed", epochs: int = 4, seed: int = 0,
             exist_ok: bool = False, predictions: bool = False, skill: float = 0.5, videos: int = 8) -> Path:
    """A run folder as train() writes it: config.json, metrics.jsonl (step + epoch lines), eval.json.

    With ``predictions`` the run is evaluated as ``affpipe evaluate`` does: per-frame predictions
    (``skill`` 0..1: how close to the shared labels of a ``videos``-video split) kept in
    ``eval_predictions.npz``, and eval.json's metrics and 95% intervals computed from them.
    """
    rng = np.random.default_rng(seed)
    tasks = ("va", "expr", "au") if task == "mtl" else (task,)
    run = root / name
    run.mkdir(parents=True, exist_ok=exist_ok)
    config = {"task": task, "epochs": epochs, "shards": "shards/x", "out": str(run),
              "model": {"arch": "resnet18", "tasks": list(tasks), "init": init, "dropout": 0.0},
              "loss": {"va_loss": va_loss, "expr_class_weights": weighted, "au_pos_weight": weighted,
                       "task_weighting": weighting, "task_weights": [1, 1, 1]}}
    config["seed"] = seed
    (run / "config.json").write_text(json.dumps(config))
    ev: dict = fake_evaluation(run, tasks, seed=seed, skill=skill, videos=videos) if predictions else {}
    if "va" in tasks and not predictions:
        v, a = rng.uniform(0.1, 0.5, 2)
        ev.update(valence_ccc=float(v), arousal_ccc=float(a), va_ccc=float((v + a) / 2))
    if "expr" in tasks and not predictions:
        per = rng.uniform(0, 0.6, len(EXPR_CLASSES))
        ev.update(expr_f1=float(per.mean()), expr_f1_per_class=dict(zip(EXPR_CLASSES, per.tolist(), strict=True)))
    if "au" in tasks and not predictions:
        per = rng.uniform(0, 0.7, len(AU_NAMES))
        ev.update(au_f1=float(per.mean()), au_f1_per_au=dict(zip(AU_NAMES, per.tolist(), strict=True)))
    if task == "mtl" and not predictions:
        ev["p_mtl"] = ev["va_ccc"] + ev["expr_f1"] + ev["au_f1"]
    (run / "eval.json").write_text(json.dumps(ev))
    lines = []
    for e in range(epochs):
        lines.append({"kind": "train", "step": e * 10 + 5, "epoch": e, "loss": 1.0 / (e + 1)})  # no val
        frac = (e + 1) / epochs  # rises to the final value
        vals = {k: ev[k] * frac for t in tasks for k in TASK_KEYS[t]}
        if task == "mtl":
            vals["p_mtl"] = ev["p_mtl"] * frac
        line = {"kind": "epoch", "epoch": e, "step": (e + 1) * 10, "wall_time": 12.5 * (e + 1), "train_loss": 0.5,
                "val": vals, "val_frames": 100, "val_time_s": 1.5}
        lines.append(line)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return run


def fake_evaluation(run: Path, tasks: tuple[str, ...], *, seed: int, skill: float, videos: int = 8,
                    frames: int = 40) -> dict:
    """Predictions of quality ``skill`` on a fixed split (labels the same for every run), kept as
    ``eval_predictions.npz``; returns eval.json's content (metrics and intervals) computed from them."""
    from affpipe.scoring.bootstrap import (
        bootstrap_result,
        metrics_from_stats,
        save_predictions,
        video_stats,
    )

    lab = np.random.default_rng(1234)
    n = videos * frames
    video = np.repeat([f"v{i:02d}" for i in range(videos)], frames)
    va_t = lab.uniform(-1, 1, (n, 2)).astype(np.float32)
    expr_t = lab.integers(0, 8, n).astype(np.int8)
    au_t = (lab.random((n, 12)) < 0.3).astype(np.int8)
    rng = np.random.default_rng(seed + 1)
    arrays: dict = {"row_id": np.arange(n, dtype=np.int64) * 3}
    if "va" in tasks:
        arrays.update(va_pred=(skill * va_t + rng.normal(0, 0.6, va_t.shape)).astype(np.float32), va_target=va_t,
                      va_mask=np.ones(n, bool))
    if "expr" in tasks:
        arrays.update(expr_pred=np.where(rng.random(n) < skill, expr_t, rng.integers(0, 8, n)).astype(np.int64),
                      expr_target=expr_t, expr_mask=np.ones(n, bool))
    if "au" in tasks:
        arrays.update(au_prob=np.clip(skill * au_t + rng.uniform(0, 1 - skill, au_t.shape), 0, 1).astype(np.float32),
                      au_target=au_t, au_mask=np.ones((n, 12), bool))
    save_predictions(run / "eval_predictions.npz", arrays, video)
    point = metrics_from_stats(video_stats(arrays, video), np.ones((1, videos)))
    ev: dict = {}
    for key, value in point.items():
        if key == "expr_f1_per_class":
            ev[key] = dict(zip(EXPR_CLASSES, value[0].tolist(), strict=True))
        elif key == "au_f1_per_au":
            ev[key] = dict(zip(AU_NAMES, value[0].tolist(), strict=True))
        else:
            ev[key] = float(value[0])
    ev.update(bootstrap_result(arrays, video, resamples=200), predictions="eval_predictions.npz")
    return ev


def make_index(root: Path, videos: int = 6, frames: int = 30, seed: int = 0) -> Path:
    """A hand-made index (FRAMES_SCHEMA + index.json) over two image roots of tiny JPEGs.

    Videos 0..videos-3 are train, the last two val. Every 11th frame has no image, every 7th
    has no valid label in any task; the other labels are random with random invalid parts.
    """
    rng = np.random.default_rng(seed)
    roots = [root / "cropped_aligned", root / "cropped_aligned_new_50_vids"]
    rows = []
    for v in range(videos):
        video = f"{v + 1:03d}-{v * 7 % 13}" + ("_left" if v == 1 else "")
        r = v % 2
        for f in range(1, frames + 1):
            image = f"{video}/{f:05d}.jpg" if f % 11 else None
            if image:
                (roots[r] / video).mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (24, 24, 3), np.uint8)
                cv2.imwrite(str(roots[r] / image), pixels)
            none = f % 7 == 0
            va_valid = not none and rng.random() < 0.7
            expr_valid = not none and rng.random() < 0.5
            au_valid = not none and rng.random() < 0.6
            aus = rng.integers(0, 2, len(AU_NAMES)) if au_valid else np.full(len(AU_NAMES), -1)
            rows.append({
                "row_id": len(rows), "video": video, "frame": f,
                "split": "train" if v < videos - 2 else "val",
                "image": image, "image_root": r if image else -1, "has_image": image is not None,
                "valence": float(rng.uniform(-1, 1)) if va_valid else float("nan"),
                "arousal": float(rng.uniform(-1, 1)) if va_valid else float("nan"),
                "va_valid": va_valid,
                "expr": int(rng.integers(0, 8)) if expr_valid else -1, "expr_valid": expr_valid,
                **{a: int(x) for a, x in zip(AU_NAMES, aus, strict=True)}, "au_valid": au_valid,
            })
    index = root / "index"
    index.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=FRAMES_SCHEMA), index / "frames.parquet")
    meta = {"schema_version": 1, "image_roots": [str(p.resolve()) for p in roots], "layouts": {}, "counts": {}}
    (index / "index.json").write_text(json.dumps(meta))
    return index


# The session's trained artifacts (``conftest.trained_world``): tiny images, two steps, the torch
# loader in-process.
# A tiny backbone (timm's ``test_resnet``, 0.4M parameters) wherever a test is not about the backbone.
TINY_RUN = {"task": "mtl", "epochs": 1, "image_size": 32, "batch_size": 16, "max_steps_per_epoch": 2,
            "model.arch": "timm/test_resnet", "loader.num_workers": 0, "loader.backend": "torch", "device": "cpu",
            "log_every": 1}
TINY_TEMPORAL = {"window": 8, "stride": 4, "hidden": 16, "layers": 1}


def kill9_at_checkpoint(args: list[str], out: Path, seen, *, timeout_s: float = 120) -> None:
    """Start the command ``args`` and ``kill -9`` it as soon as ``out/last.pt`` holds a state for
    which ``seen(state)`` is true (checkpoints are written atomically: never read torn); fails if
    the command ends first."""
    import signal
    import subprocess
    import time

    from affpipe.run.checkpoint import load_checkpoint

    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "last.pt").exists() and seen(load_checkpoint(out / "last.pt")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the checkpoint looked for was seen"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
