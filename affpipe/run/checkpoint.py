"""Checkpoints and run-folder bookkeeping: atomic saves, RNG states, resume checks.

A checkpoint is a plain dict that ``torch.load(..., weights_only=True)`` can read (tensors and
Python primitives only): ``model``, ``optimizer``, ``scheduler``, ``loss`` (the loss module's
learned weights), ``scaler``, ``epoch`` (the epoch in progress, 0-based), ``step`` (global
optimizer steps), ``step_in_epoch`` (batches of ``epoch`` already trained), ``best_score``,
``epoch_acc`` (the running sums of the epoch in progress), ``config`` and ``rng``.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from affpipe.io import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
# Keys that may differ between a killed run and its --resume (out, index: folders may be moved;
# the loader's backend, workers and on_bad: what a loader error tells the user to change, and
# both backends read the same epoch plan; logging: what is written besides metrics.jsonl).
RESUME_MUTABLE = ("resume", "epochs", "out", "index", "loader.backend", "loader.num_workers", "loader.on_bad",
                  "logging")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a kill leaves the old file or the new one, whole."""
    path = Path(path)
    with atomic_open(path, "wb") as fh:  # a failed write names the file (torch's own message does not)
        torch.save({"checkpoint_version": CHECKPOINT_VERSION, **state}, fh)


def safe_torch_load(path: Path, map_location: str | torch.device = "cpu") -> object:
    """``torch.load(weights_only=True)``, never anything else: a file that needs more than tensors
    and primitives is refused with the reason (loading a checkpoint never runs code from it)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError, KeyError (not a pickle), RuntimeError (not a zip)...
        from affpipe.models.weights import damaged, truncated_message

        if damaged(path, exc):  # a torch file cut short is damage, not a security refusal
            raise ValueError(truncated_message(path, exc, "checkpoint")) from exc
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{path}: refused: not a checkpoint that torch.load(weights_only=True) can read "
            f"({type(exc).__name__}: {first}); affpipe never unpickles arbitrary objects, which could run code"
        ) from exc


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (tensors and primitives only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = safe_torch_load(path, map_location=map_location)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        keys = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not an affpipe checkpoint (holds {keys})")
    return state


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states, as tensors and primitives."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured (the CUDA part only when CUDA is present).

    The tensors may sit on any device (a resume loads the checkpoint onto the training device):
    each is brought to the host first."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two ``to_dict`` configs, ignoring ``RESUME_MUTABLE``."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if f"{prefix}{key}" in RESUME_MUTABLE:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if not prefix and key in ("shards", "out", "index", "features") and isinstance(a, str) and isinstance(b, str):
            if Path(a).resolve() == Path(b).resolve():  # the same folder, spelled another way
                continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} (checkpoint) != {b!r} (now)")
    return diffs


def truncate_metrics(path: Path, *, step: int, epoch: int) -> int:
    """Drop ``metrics.jsonl`` lines written after a checkpoint; returns how many were dropped.

    A run killed after its last checkpoint logged steps it will redo on resume: train lines
    with ``step`` past the checkpoint and epoch lines of epochs it had not completed go, so
    the resumed log has every step once.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            dropped += 1
            continue
        by_step = rec.get("kind") in ("train", "start")  # "start": a temporal run's step-0 validation
        late = rec.get("step", 0) > step if by_step else rec.get("epoch", 0) >= epoch
        if late:
            dropped += 1
        else:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))
    if dropped:
        log.info("metrics.jsonl: dropped %d line(s) logged after the checkpoint", dropped)
    return dropped


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (an incomplete last line is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
