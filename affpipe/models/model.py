"""A backbone (torchvision's ResNet-18 by default; any torchvision model by name, or timm's as
``timm/NAME``) with one linear head per task (VA, EXPR, AU), its input op and initializations.

``build_model(ModelConfig(...))`` returns a module whose ``forward(images)`` (uint8 NCHW from the
loaders — contiguous or channels_last — or float already normalized) gives ``{"va": [N,2] in
[-1,1], "expr": [N,8] logits, "au": [N,12] logits}`` for the configured tasks. Its first op
(``InputNorm``) resizes to the backbone's input size on the device and normalizes with the
backbone's mean/std (``ModelConfig.input_size``/``mean``/``std``/``interpolation``, else the
backbone's own: :mod:`affpipe.models.backbones`). Parameters are named ``backbone.*`` and
``heads.<task>.*`` so a checkpoint's backbone can seed another model (e.g. a uni-task model's
backbone to start a multi-task one) without touching its heads.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from affpipe.batch import InputNorm as ImageNetNorm
from affpipe.batch import fp32
from affpipe.labels import NUM_AU, NUM_EXPR, TASKS

log = logging.getLogger(__name__)

HEAD_OUTPUTS = {"va": 2, "expr": NUM_EXPR, "au": NUM_AU}
PUBLISHED = ("imagenet", "pretrained")  # init: the backbone's published weights (from the local cache)


@dataclass(frozen=True)
class ModelConfig:
    """Model options. ``arch``: a torchvision model name or ``timm/NAME``. ``init``: ``"random"``,
    ``"imagenet"`` (or ``"pretrained"``: the backbone's published weights, from the local cache)
    or the path of a weight file (``.safetensors``, a state dict, an affpipe checkpoint).
    ``input_size``/``mean``/``std``/``interpolation``: the backbone's input (``None``: the
    backbone's own; a backbone that takes any size sees the loader's ``image_size``)."""

    arch: str = "resnet18"
    tasks: tuple[str, ...] = ("va", "expr", "au")
    init: str = "random"
    dropout: float = 0.0
    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None

    def __post_init__(self) -> None:
        from affpipe.models.backbones import INTERPOLATIONS, check_arch

        # Recipes arrive from TOML/JSON with lists and paths; normalize so the config stays hashable.
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "init", str(self.init))
        check_arch(self.arch)
        if not self.tasks or any(t not in TASKS for t in self.tasks) or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"ModelConfig.tasks must be distinct tasks from {TASKS}, got {self.tasks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.input_size is not None and self.input_size < 8:
            raise ValueError(f"model.input_size must be >= 8, got {self.input_size}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                object.__setattr__(self, name, value)
                if len(value) != 3 or not all(math.isfinite(v) for v in value) or (name == "std" and min(value) <= 0):
                    raise ValueError(f"model.{name} must be 3 finite numbers{' > 0' if name == 'std' else ''}, got {value}")
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"model.interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")


def resolve_input(cfg: ModelConfig, image_size: int | None = None) -> ModelConfig:
    """``cfg`` with its input filled in from the backbone (what a run records in config.json):
    a backbone that takes any size sees ``image_size`` (the loader's), a fixed-size one its own."""
    from affpipe.models.backbones import default_input

    spec = default_input(cfg.arch)
    size = cfg.input_size or (spec.size if spec.fixed else image_size)
    return replace(cfg, input_size=size, mean=cfg.mean or spec.mean, std=cfg.std or spec.std,
                   interpolation=cfg.interpolation or spec.interpolation)


def normalize_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N,3,H,W]`` (any memory format) → float normalized with ImageNet's statistics
    (``affpipe.batch.normalize_uint8``: the same arithmetic as a loader with ``normalize=True``)."""
    from affpipe.batch import normalize_nchw

    return normalize_nchw(images)


class InputNorm(nn.Module):
    """The model's first op: uint8 images → the backbone's input, on the device, in fp32.

    Resizes to ``size`` (when given and different) with the backbone's interpolation, then
    normalizes with its mean/std. ImageNet's statistics at the arriving size take the loaders'
    own arithmetic (``normalize_input``). Float input is taken as already normalized (a loader
    with ``normalize=True``) and only resized.
    """

    def __init__(self, size: int | None, mean, std, interpolation: str = "bilinear") -> None:
        from affpipe.models.backbones import IMAGENET_MEAN, IMAGENET_STD

        super().__init__()
        self.size, self.interpolation = size, interpolation
        self.imagenet = all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip((*mean, *std), (*IMAGENET_MEAN, *IMAGENET_STD), strict=True))
        # Not saved with the weights (persistent=False): they follow the config, and checkpoints
        # written before this op existed load unchanged.
        self.register_buffer("mean255", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("inv255", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0), persistent=False)
        self.imagenet_norm = ImageNetNorm() if self.imagenet else None

    def resize(self, x: torch.Tensor, pixels: bool = False) -> torch.Tensor:
        """``x`` at ``size``; ``pixels``: values are 0..255 (bicubic overshoot clamped back)."""
        size = self.size
        if size is None or (x.shape[-1] == size and x.shape[-2] == size):
            return x
        smooth = self.interpolation in ("bilinear", "bicubic")
        out = F.interpolate(x, size=(size, size), mode=self.interpolation,
                            **({"align_corners": False, "antialias": x.shape[-1] > size} if smooth else {}))
        return out.clamp_(0.0, 255.0) if pixels and self.interpolation == "bicubic" else out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with fp32(images.device):  # (autocast off; a no-op on devices autocast does not know)
            if images.dtype != torch.uint8:
                return self.resize(images)
            same = self.size is None or (images.shape[-1] == self.size and images.shape[-2] == self.size)
            if same and self.imagenet:  # the loaders' arithmetic; buffers under torch.compile
                return self.imagenet_norm(images)
            x = self.resize(images.float(), pixels=True)
            return (x - self.mean255) * self.inv255

    def extra_repr(self) -> str:
        return f"size={self.size}, interpolation={self.interpolation}, imagenet_stats={self.imagenet}"


class MultiTaskNet(nn.Module):
    """Input op → backbone (classifier removed) → dropout → one linear head per task; VA goes
    through tanh. ``classifier``: the name the backbone's classifier had (dropped from weight
    files); ``init_report``: where the backbone's weights came from (key summary of a file)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, tasks: tuple[str, ...], dropout: float,
                 input_norm: InputNorm | None = None, classifier: str = "fc") -> None:
        from affpipe.models.backbones import IMAGENET_MEAN, IMAGENET_STD

        super().__init__()
        self.tasks = tasks
        self.classifier = classifier
        self.init_report: dict[str, Any] | None = None
        self.input_norm = input_norm or InputNorm(None, IMAGENET_MEAN, IMAGENET_STD)
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.heads = nn.ModuleDict({t: nn.Linear(feature_dim, HEAD_OUTPUTS[t]) for t in tasks})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features of ``images`` (what ``affpipe embed`` stores)."""
        return self.backbone(self.input_norm(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw outputs per head: ``va`` ``[N,2]`` through tanh (in [-1, 1]); ``expr`` ``[N,8]`` and
        ``au`` ``[N,12]`` logits (softmax / sigmoid for probabilities)."""
        feats = self.dropout(self.features(images))
        out = {t: head(feats) for t, head in self.heads.items()}
        if "va" in out:
            out["va"] = torch.tanh(out["va"])
        return out


def build_model(cfg: ModelConfig) -> MultiTaskNet:
    """The model for ``cfg``, initialized as ``cfg.init`` says (heads are always fresh)."""
    from affpipe.models.backbones import default_input, make_backbone, pretrained_state_dict

    spec = default_input(cfg.arch)
    size = cfg.input_size or (spec.size if spec.fixed else None)
    state, source = pretrained_state_dict(cfg.arch) if cfg.init in PUBLISHED else (None, None)
    backbone, width, classifier = make_backbone(cfg.arch, state, input_size=size)
    norm = InputNorm(size, cfg.mean or spec.mean, cfg.std or spec.std, cfg.interpolation or spec.interpolation)
    model = MultiTaskNet(backbone, width, cfg.tasks, cfg.dropout, norm, classifier)
    if state is not None:
        log.info("backbone initialized from the published weights of %s (%s)", cfg.arch, source)
        model.init_report = {"file": str(source), "published": cfg.arch}
    elif cfg.init != "random":
        model.init_report = load_backbone(model, cfg.init)
    return model


def imagenet_cache_file(arch: str = "resnet18") -> Path:
    """Where torch hub keeps (and looks for) torchvision's ImageNet weights of ``arch``."""
    from affpipe.models.backbones import imagenet_cache_file as cache_file

    return cache_file(arch)


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights with its own key names (no ``backbone.`` prefix, no classifier).

    Unwraps DDP and ``torch.compile``; ``load_backbone`` accepts a file holding this dict.
    """
    return {k: v.detach().clone() for k, v in _unwrap(model).backbone.state_dict().items()}


def load_backbone(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Copy a weight file's backbone weights into ``model.backbone``; never its heads.

    ``path``: an affpipe checkpoint, a bare state dict (wrapped key names are unwrapped), or a
    ``.safetensors`` file (:mod:`affpipe.models.weights`). Returns the key summary
    (``loaded``/``missing``/``unexpected``/``ignored`` lists, ``file``, ``sha256``); missing or
    unexpected keys are logged as warnings, too little matching or a shape mismatch is an error.
    """
    from affpipe.models.weights import load_into

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init/--weights {path}: no such weight file (or use 'random' / 'imagenet')")
    inner = _unwrap(model)
    return load_into(inner.backbone, path, getattr(inner, "classifier", None))
