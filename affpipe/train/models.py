"""A torchvision backbone (ResNet-18 by default; any classification model by name) with one
linear head per task (VA, EXPR, AU), and its initializations.

``build_model(ModelConfig(...))`` returns a module whose ``forward(images)`` (float, normalized,
NCHW — contiguous or channels_last) gives ``{"va": [N,2] in [-1,1], "expr": [N,8] logits,
"au": [N,12] logits}`` for the configured tasks. Parameters are named ``backbone.*`` and
``heads.<task>.*`` so a checkpoint's backbone can seed another model (e.g. a uni-task model's
backbone to start a multi-task one) without touching its heads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from affpipe.batch import InputNorm
from affpipe.labels import NUM_AU, NUM_EXPR, TASKS
from affpipe.train.checkpoint import safe_torch_load

log = logging.getLogger(__name__)

HEAD_OUTPUTS = {"va": 2, "expr": NUM_EXPR, "au": NUM_AU}
# Prefixes added by DistributedDataParallel and torch.compile to a saved state_dict.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class ModelConfig:
    """Model options. ``init``: ``"random"``, ``"imagenet"`` or the path of a checkpoint."""

    arch: str = "resnet18"
    tasks: tuple[str, ...] = ("va", "expr", "au")
    init: str = "random"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # Recipes arrive from TOML/JSON with lists and paths; normalize so the config stays hashable.
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "init", str(self.init))
        check_arch(self.arch)
        if not self.tasks or any(t not in TASKS for t in self.tasks) or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"ModelConfig.tasks must be distinct tasks from {TASKS}, got {self.tasks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")


def backbone_names() -> list[str]:
    """The torchvision classification models ``--backbone`` accepts."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> None:
    """A clear error for a name torchvision has no classification model under."""
    names = backbone_names()
    if arch not in names:
        close = [n for n in names if n.startswith(arch[:4])][:8] or names[:8]
        raise ValueError(f"backbone {arch!r} is not a torchvision classification model (e.g. {', '.join(close)})")


def make_backbone(arch: str, state: Mapping[str, torch.Tensor] | None = None) -> tuple[nn.Module, int]:
    """torchvision's ``arch`` (with ``state`` loaded, when given) without its classifier, and the
    width of the features it then returns: the last ``nn.Linear`` becomes an identity."""
    from torchvision.models import get_model

    check_arch(arch)
    model = get_model(arch, weights=None)
    if state is not None:
        model.load_state_dict(state, strict=True)
    last = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"backbone {arch!r}: no final nn.Linear classifier to remove")
    name, linear = last[-1]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    if hasattr(model, "aux_logits"):  # Inception/GoogLeNet: the auxiliary classifier only trains
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    return model, int(linear.in_features)


def normalize_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N,3,H,W]`` (any memory format) → the float normalized input the backbone expects
    (``affpipe.batch.normalize_uint8``: the same arithmetic as a loader with ``normalize=True``)."""
    from affpipe.batch import normalize_nchw

    return normalize_nchw(images)


class MultiTaskNet(nn.Module):
    """Backbone (fc removed) → dropout → one linear head per task; VA goes through tanh."""

    def __init__(self, backbone: nn.Module, feature_dim: int, tasks: tuple[str, ...], dropout: float) -> None:
        super().__init__()
        self.tasks = tasks
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.heads = nn.ModuleDict({t: nn.Linear(feature_dim, HEAD_OUTPUTS[t]) for t in tasks})
        self.input_norm = InputNorm()  # constants as buffers: torch.compile does not rebuild them

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype == torch.uint8:  # loaders' normalize=False: normalize here, in fp32
            images = self.input_norm(images)
        feats = self.dropout(self.backbone(images))
        out = {t: head(feats) for t, head in self.heads.items()}
        if "va" in out:
            out["va"] = torch.tanh(out["va"])
        return out


def build_model(cfg: ModelConfig) -> MultiTaskNet:
    """The model for ``cfg``, initialized as ``cfg.init`` says (heads are always fresh)."""
    state = _imagenet_state_dict(cfg.arch) if cfg.init == "imagenet" else None
    backbone, width = make_backbone(cfg.arch, state)
    model = MultiTaskNet(backbone, width, cfg.tasks, cfg.dropout)
    if state is not None:
        log.info("backbone initialized from torchvision's ImageNet weights for %s", cfg.arch)
    elif cfg.init != "random":
        load_backbone(model, cfg.init)
    return model


def _imagenet_url(arch: str) -> str:
    from torchvision.models import get_model_weights

    check_arch(arch)
    # ResNet-18: IMAGENET1K_V1 (resnet18-f37072fd.pth), the weights the research used.
    return get_model_weights(arch).DEFAULT.url


def imagenet_cache_file(arch: str = "resnet18") -> Path:
    """Where torch hub keeps (and looks for) torchvision's ImageNet weights of ``arch``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(_imagenet_url(arch)).name


def _imagenet_state_dict(arch: str = "resnet18") -> dict[str, torch.Tensor]:
    url = _imagenet_url(arch)
    cached = imagenet_cache_file(arch)
    try:
        # Finds the cached file first; downloads only when it is absent.
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True)
    except Exception as exc:  # URLError, socket errors, hash mismatch, a partial file...
        raise RuntimeError(
            f"could not load the ImageNet {arch} weights: {cached} is not there and downloading "
            f"{url} failed ({type(exc).__name__}: {exc}). "
            f"On an offline machine, copy {cached.name} to {cached}, "
            f"or pass --init PATH with a checkpoint (an affpipe .pt or that torchvision .pth file)."
        ) from exc


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights with torchvision ResNet key names (no ``backbone.`` prefix, no fc).

    Unwraps DDP and ``torch.compile``; ``load_backbone`` accepts a file holding this dict.
    """
    return {k: v.detach().clone() for k, v in _unwrap(model).backbone.state_dict().items()}


def _read_checkpoint(path: Path) -> Mapping[str, torch.Tensor]:
    obj = safe_torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state_dict or a dict with a 'model' state_dict")
    return obj


def load_backbone(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Copy a checkpoint's backbone weights into ``model.backbone``; never its heads.

    ``path`` holds an affpipe checkpoint (dict with ``"model"``), a bare state_dict with
    ``backbone.*`` keys, or torchvision ResNet keys (``conv1.weight``…, e.g. the ImageNet
    ``.pth``; its ``fc`` is ignored). Returns ``{"loaded", "missing", "unexpected", "ignored"}``
    key lists; missing or unexpected backbone keys are logged as warnings, and a checkpoint
    with no matching backbone key (or a shape mismatch) is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init {path}: no such checkpoint file (or use 'random' / 'imagenet')")
    raw = _read_checkpoint(path)
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    if any(k.startswith("backbone.") for k in state):
        src = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        ignored = sorted(k for k in state if not k.startswith("backbone."))
    else:  # torchvision layout (or backbone_state_dict output): everything but fc is backbone
        src = {k: v for k, v in state.items() if not k.startswith("fc.")}
        ignored = sorted(k for k in state if k.startswith("fc."))
    target = _unwrap(model).backbone
    own = target.state_dict()
    loaded = sorted(k for k in src if k in own)
    if not loaded:
        sample = ", ".join(list(state)[:5])
        raise ValueError(
            f"{path}: no backbone weights found (expected 'backbone.*' or torchvision ResNet keys; "
            f"the file has {len(state)} keys such as {sample})"
        )
    bad = [f"{k}: {tuple(src[k].shape)} vs {tuple(own[k].shape)}" for k in loaded if src[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"{path}: backbone shape mismatch (checkpoint vs model): {'; '.join(bad[:5])}")
    missing = sorted(k for k in own if k not in src)
    unexpected = sorted(k for k in src if k not in own)
    target.load_state_dict({k: src[k] for k in loaded}, strict=False)
    if missing:
        log.warning("%s: %d backbone keys missing, left as initialized: %s", path, len(missing), ", ".join(missing[:10]))
    if unexpected:
        log.warning("%s: %d unexpected backbone keys ignored: %s", path, len(unexpected), ", ".join(unexpected[:10]))
    log.info("backbone initialized from %s (%d tensors; %d non-backbone keys ignored)", path, len(loaded), len(ignored))
    return {"loaded": loaded, "missing": missing, "unexpected": unexpected, "ignored": ignored}
