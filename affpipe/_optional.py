"""Optional imports in one place, each with a clear message when missing."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

DALI_HINT = (
    "NVIDIA DALI is not installed. On Linux x86-64: pip install nvidia-dali-cuda130 "
    "(it also runs CPU-only). Elsewhere use --backend torch."
)


@functools.cache
def dali_available() -> bool:
    try:
        importlib.import_module("nvidia.dali")
    except Exception:  # ImportError, or a broken CUDA runtime on import
        return False
    return True


def import_dali() -> ModuleType:
    """``nvidia.dali``, or an ImportError that says how to get it."""
    try:
        return importlib.import_module("nvidia.dali")
    except Exception as exc:
        raise ImportError(DALI_HINT) from exc


TENSORBOARD_HINT = "TensorBoard logging needs the tensorboard package: pip install 'affpipe[tensorboard]'"


def import_summary_writer() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or an ImportError that says how to get it."""
    try:
        return importlib.import_module("torch.utils.tensorboard").SummaryWriter
    except Exception as exc:  # ImportError: tensorboard missing (torch's module imports it)
        raise ImportError(TENSORBOARD_HINT) from exc


MTCNN_HINT = (
    "affpipe crop needs facenet-pytorch (its MTCNN face detector ships its weights in the wheel): "
    "pip install --no-deps facenet-pytorch requests (or make install)"
)


def import_mtcnn() -> ModuleType:
    """``facenet_pytorch.models.mtcnn`` (PNet, RNet, ONet, detect_face; the weights in
    ``facenet_pytorch/data/``), or an ImportError that says how to get it."""
    try:
        return importlib.import_module("facenet_pytorch.models.mtcnn")
    except Exception as exc:  # ImportError: the package, or `requests` it imports, is missing
        raise ImportError(f"{MTCNN_HINT} ({type(exc).__name__}: {exc})") from exc
