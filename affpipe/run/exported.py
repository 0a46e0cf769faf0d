"""``affpipe export``: a run's model as one ``.safetensors`` file — weights only, no optimizer.

The file holds the model's tensors and, in the safetensors metadata (strings only), everything
a model needs to be rebuilt and used: the resolved config (``config``), the tuned AU thresholds
and smoothing windows when the run has them, a temporal run's frozen encoders (``encoders``:
their specs, ``affpipe.run.crops.EncoderSpec``; their tensors are ``encoders.<k>.*``), the source checkpoint's name and sha256, and
``content_sha256``: a digest over the config, the other metadata and every tensor (name, dtype,
shape, bytes). :func:`read_export` recomputes it and refuses a file whose bytes changed since
export with one line. (A digest stored in the file proves integrity against damage and edits by
hand, not against someone who rewrites the digest too: that would take a signature.)

``open_run`` and ``predict`` take such a file in place of a run folder (:func:`is_export`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

EXPORT_FORMAT = "affpipe-export"
EXPORT_VERSION = 1
_DIGEST = "content_sha256"


def is_export(path: Path) -> bool:
    """Whether ``path`` is a file to be read as an export (by its suffix: ``.safetensors``)."""
    return Path(path).suffix == ".safetensors" and Path(path).is_file()


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(meta):
        if key != _DIGEST:
            h.update(json.dumps([key, meta[key]]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_export(state: dict[str, Any], out: Path, *, source: Path, source_sha256: str,
                 au_thresholds: dict[str, float] | None = None, smoothing: dict[str, int] | None = None) -> dict:
    """Write ``state["model"]`` and ``state["config"]`` to ``out`` (atomically); returns what it recorded."""
    from safetensors.torch import save

    from affpipe.io import atomic_open

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: an export is a .safetensors file (name it FILE.safetensors)")
    # clone: tensors sharing storage (tied or viewed) are refused by safetensors
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state["model"].items()}
    meta = {"format": EXPORT_FORMAT, "version": str(EXPORT_VERSION),
            "config": json.dumps(state["config"], sort_keys=True),
            "source_checkpoint": Path(source).name, "source_sha256": source_sha256,
            "epoch": str(state.get("epoch", "")), "step": str(state.get("step", ""))}
    if au_thresholds is not None:
        meta["au_thresholds"] = json.dumps(au_thresholds, sort_keys=True)
    if smoothing is not None:
        meta["smoothing"] = json.dumps(smoothing, sort_keys=True)
    if state.get("encoders"):  # a temporal run's frozen encoders (their tensors are in state["model"])
        meta["encoders"] = json.dumps(state["encoders"], sort_keys=True)
    meta[_DIGEST] = _digest(meta, tensors)
    with atomic_open(out, "wb") as fh:
        fh.write(save(tensors, metadata=meta))
    return {k: v for k, v in meta.items() if k != "config"}


def read_export(path: Path) -> dict[str, Any]:
    """A checkpoint-like state (``model``, ``config``, ``export`` metadata, and ``au_thresholds`` /
    ``smoothing`` when recorded) from an exported file; a tampered or foreign file: one error."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"{path}: refused: not a readable safetensors file ({first})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not an affpipe export (a plain weight file? use it with --init); "
                         "make one with `affpipe export RUN -o FILE.safetensors`")
    if meta.get(_DIGEST) != _digest(meta, tensors):
        raise ValueError(f"{path}: refused: its content does not match the digest recorded at export "
                         "(the file was changed or damaged); export the run again")
    try:
        config = json.loads(meta["config"])
        state: dict[str, Any] = {"model": tensors, "config": config, "export": meta}
        if "au_thresholds" in meta:
            state["au_thresholds"] = json.loads(meta["au_thresholds"])
        if "smoothing" in meta:
            state["smoothing"] = json.loads(meta["smoothing"])
        if "encoders" in meta:
            state["encoders"] = json.loads(meta["encoders"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: an affpipe export with unreadable metadata ({exc})") from None
    return state
