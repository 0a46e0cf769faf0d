"""Weight files for a backbone: ``.safetensors`` or a ``torch.save``d state dict, never a pickle.

``read_weights(path)`` gives ``{key: tensor}`` from a ``.safetensors`` file, or from a torch file
read with ``torch.load(weights_only=True)`` (a bare state dict, an affpipe checkpoint, or a dict
holding one under ``model``/``state_dict``/…). A whole pickled model — how HSEmotion/EmotiEffLib
publish ``enet_b0_8_best_afew.pt`` — needs unpickling, which can run any code in the file: it is
refused, never loaded, and the message gives the one command that converts it to safetensors
for a user who trusts the file.

``load_into(backbone, path, classifier)`` matches the file's keys to the backbone's after
stripping the usual wrappers (``module.``, ``_orig_mod.``, ``model.``, ``backbone.``,
``encoder.``), drops classifier and affpipe head keys, and loads what matches; it returns the
summary (matched / missing / unexpected / ignored keys). Nothing matching, less than half of the
backbone's tensors matching, or a shape that differs is an error naming the file.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# Prefixes that wrap a backbone's key names: DDP, torch.compile, and the attribute names other
# code bases keep a backbone under.
WRAPPERS = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")
# Containers a training script saves the weights under, beside optimizer state and the like.
CONTAINERS = ("model", "state_dict", "model_state_dict", "net", "module", "weights")
MIN_MATCHED = 0.5  # at least this share of the backbone's tensors must come from the file


def conversion_command(path: Path) -> str:
    """The command that turns a pickled model (or checkpoint) into a safetensors state dict.
    It unpickles the file, which runs whatever code it holds: for files the user trusts."""
    out = path.with_suffix(".safetensors")
    code = (f'import torch, safetensors.torch as st; m = torch.load({json.dumps(str(path))}, map_location="cpu", '
            'weights_only=False); sd = m.state_dict() if hasattr(m, "state_dict") else m.get("state_dict", m); '
            'st.save_file({k: v.detach().clone().contiguous() for k, v in sd.items() if torch.is_tensor(v)}, '
            f'{json.dumps(str(out))})')
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"  # the interpreter affpipe runs under


def read_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """The tensors of a weight file (``.safetensors``, or a torch file with a state dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (a pickled object), RuntimeError/KeyError (not a torch file)
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if damaged(path, exc):
            raise ValueError(truncated_message(path, exc, "weight file")) from None
        if found or "weights_only" in text or "Unsupported" in text:
            what = f" (it pickles {found.group(1)})" if found else ""
            raise ValueError(
                f"{path}: refused: a pickled Python object{what}, not a state dict that torch.load(weights_only=True) "
                f"can read; loading it would run code "
                f"from the file, which affpipe never does. If you trust the file, convert it once with: "
                f"{conversion_command(path)} — then pass the .safetensors file"
            ) from None
        raise ValueError(f"{path}: not a weight file torch.load(weights_only=True) can read "
                         f"({type(exc).__name__}: {text.strip().splitlines()[0][:200] if text.strip() else ''})") from None
    return _state_of(obj, path)


_ZIP_DAMAGE = ("failed finding central directory", "failed reading zip archive", "file read failed",
               "Ran out of input", "EOF", "unexpected end", "invalid header", "Invalid argument")


def damaged(path: Path | str, exc: BaseException) -> bool:
    """Whether ``torch.load``'s ``exc`` means a truncated or corrupt torch file (a zip archive cut
    short: a copy or a write that stopped), not a pickle that ``weights_only`` refuses."""
    text = str(exc)
    if "weights_only" in text or "Weights only load failed" in text or re.search(r"GLOBAL [\w.]+", text):
        return False  # refused for what it pickles: a security refusal, said as one
    try:
        with open(path, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"  # what torch.save writes
    except OSError:
        return False
    return zipped and (isinstance(exc, EOFError | OSError) or any(k in text for k in _ZIP_DAMAGE))


def truncated_message(path: Path | str, exc: BaseException, what: str) -> str:
    """The one line for a truncated or corrupt torch file (:func:`damaged`)."""
    text = str(exc).strip()
    first = text.splitlines()[0][:160] if text else type(exc).__name__
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    return (f"{path}: truncated or corrupt {what} ({size} bytes; {type(exc).__name__}: {first}); a copy or a "
            "write that stopped early? write it again, or use another file")


def _state_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"model": {...}}, {"state_dict": {"model": ...}}: a few levels at most
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        inner = [obj[k] for k in CONTAINERS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)]
        if not inner:
            break
        obj = inner[0]
    keys = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f"{path}: no state dict found (expected {{name: tensor}}, or one under "
                     f"{'/'.join(CONTAINERS)}; the file holds {keys})")


def _resolve(key: str, own: Mapping[str, Any]) -> tuple[str, bool]:
    """``key`` with wrapper prefixes stripped until it names one of ``own``'s (True), or as far
    as they go (False)."""
    while key not in own:
        for prefix in WRAPPERS:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            return key, False
    return key, True


def match_state(state: Mapping[str, torch.Tensor], target: nn.Module, *, drop: tuple[str, ...],
                source: str) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The part of ``state`` that loads into ``target`` and the key summary
    (``loaded``/``missing``/``unexpected``/``ignored``); an error when too little matches."""
    own = target.state_dict()
    src: dict[str, torch.Tensor] = {}
    unexpected, ignored = [], []
    for key, value in state.items():
        name, found = _resolve(key, own)
        if found:
            src[name] = value
        elif hit := next((stage for stage in _stages(key) if stage.startswith(drop)), None):
            ignored.append(hit)
        else:
            unexpected.append(name)
    counted = [k for k in own if not k.endswith("num_batches_tracked")]
    if not src:
        sample = ", ".join(list(state)[:5])
        raise ValueError(f"{source}: no backbone weights found for this backbone (the file has {len(state)} "
                         f"keys such as {sample}; the backbone's are like {', '.join(counted[:3])})")
    matched = sum(1 for k in counted if k in src)
    if matched < MIN_MATCHED * len(counted):
        raise ValueError(f"{source}: only {matched} of the backbone's {len(counted)} tensors are in the file "
                         f"({len(unexpected)} unexpected keys such as {', '.join(unexpected[:3])}): "
                         "is it another architecture?")
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in src.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{source}: backbone shape mismatch (file vs model): {'; '.join(bad[:5])}")
    summary = {"loaded": sorted(src), "missing": sorted(k for k in counted if k not in src),
               "unexpected": sorted(unexpected), "ignored": sorted(ignored)}
    return src, summary


def _stages(key: str):
    yield key
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPERS:
            if key.startswith(prefix):
                key = key[len(prefix):]
                stripped = True
                yield key
                break


def load_into(backbone: nn.Module, path: Path | str, classifier: str | None = None) -> dict[str, Any]:
    """Load ``path``'s weights into ``backbone`` (see the module docstring); its summary, with
    the file's sha256. ``classifier``: the name the backbone's classifier had (its keys are
    dropped, as are affpipe's ``heads.``)."""
    from affpipe.io import sha256_file

    path = Path(path)
    drop = ("heads.", "fc.") if classifier is None else ("heads.", classifier + ".")
    src, summary = match_state(read_weights(path), backbone, drop=drop, source=str(path))
    backbone.load_state_dict(src, strict=False)
    if summary["missing"]:
        log.warning("%s: %d backbone keys missing, left as initialized: %s", path, len(summary["missing"]),
                    ", ".join(summary["missing"][:10]))
    if summary["unexpected"]:
        log.warning("%s: %d unexpected backbone keys ignored: %s", path, len(summary["unexpected"]),
                    ", ".join(summary["unexpected"][:10]))
    log.info("backbone initialized from %s: %d tensors matched, %d missing, %d unexpected, %d classifier/head "
             "keys dropped", path, len(summary["loaded"]), len(summary["missing"]), len(summary["unexpected"]),
             len(summary["ignored"]))
    return {**summary, "file": str(path.resolve()), "sha256": sha256_file(path)}


def summary_counts(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The summary as counts plus the first few names (what a run's log records)."""
    out: dict[str, Any] = {k: summary[k] for k in ("file", "sha256") if k in summary}
    for k in ("loaded", "missing", "unexpected", "ignored"):
        out[k] = len(summary.get(k, []))
        if k != "loaded" and summary.get(k):
            out[f"{k}_keys"] = list(summary[k][:20])
    return out
