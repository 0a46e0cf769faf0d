"""Backbones by name, their published weights from the local cache, and the input each expects.

Two zoos: torchvision's classification models (``resnet18``, ``efficientnet_b0``…) and timm's
(``timm/NAME``, any name ``timm.list_models()`` gives, optionally ``timm/NAME.TAG``). The prefix
keeps the two apart: ``efficientnet_b0`` is torchvision's, ``timm/efficientnet_b0`` timm's.
A backbone is the classification model without its classifier: torchvision's last
``nn.Linear`` becomes an identity; timm's is made with ``num_classes=0``, so its output is the
pooled features timm gives (``head_hidden_size`` wide, else ``num_features``).

``InputSpec`` is what the backbone expects: size (``None``: any, e.g. a CNN), mean/std and
interpolation, from timm's pretrained config or torchvision's weights transforms. Published
weights are looked up in the local caches only (timm: the Hugging Face hub cache, then torch
hub's; torchvision: torch hub's). Nothing is ever downloaded: a miss is one line naming the exact
file looked for and the ``--init random`` override.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm/"
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """What a backbone expects: ``size`` (``None``: any size works), per-channel ``mean``/``std``
    of [0,1] pixels, ``interpolation`` for resizing to ``size``; ``fixed``: only ``size`` works."""

    size: int | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    fixed: bool = False


def is_timm(arch: str) -> bool:
    return arch.startswith(TIMM_PREFIX)


def timm_name(arch: str) -> str:
    """``timm/NAME[.TAG]`` → ``NAME[.TAG]``."""
    return arch[len(TIMM_PREFIX):]


def backbone_names() -> list[str]:
    """The torchvision classification models ``--backbone`` accepts (timm's: ``timm/NAME``)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> None:
    """A clear error for a name neither torchvision nor (with ``timm/``) timm has a model under."""
    if is_timm(arch):
        import timm

        name = timm_name(arch)
        if not name or not timm.is_model(name.split(".")[0]):
            close = timm.list_models(f"*{name.split('.')[0][:5]}*")[:8] or timm.list_models()[:8]
            raise ValueError(f"backbone {arch!r}: timm has no model {name!r} (e.g. {', '.join('timm/' + n for n in close)})")
        return
    names = backbone_names()
    if arch not in names:
        close = [n for n in names if n.startswith(arch[:4])][:8] or names[:8]
        raise ValueError(f"backbone {arch!r} is not a torchvision classification model (e.g. {', '.join(close)}; "
                         "timm's models as timm/NAME)")


def _timm_cfg(arch: str):
    from timm.models import get_pretrained_cfg

    name = timm_name(arch)
    return get_pretrained_cfg(name) or get_pretrained_cfg(name.split(".")[0])


def default_input(arch: str) -> InputSpec:
    """The input ``arch``'s published weights were trained with (ImageNet's statistics and
    bilinear when it publishes none). CNNs take any size (``size=None``); a ViT-style model
    that only takes its own size is ``fixed``."""
    check_arch(arch)
    if is_timm(arch):
        pc = _timm_cfg(arch)
        if pc is None:
            return InputSpec(None)
        fixed = bool(pc.fixed_input_size)
        interp = pc.interpolation if pc.interpolation in INTERPOLATIONS else "bilinear"
        return InputSpec(int(pc.input_size[-1]) if fixed else None, tuple(map(float, pc.mean)),
                         tuple(map(float, pc.std)), interp, fixed)
    from torchvision.models import get_model_weights

    fixed = arch.startswith(("vit_", "maxvit"))  # torchvision's ViTs take only their own size
    try:
        t = get_model_weights(arch).DEFAULT.transforms()
    except (ValueError, AttributeError, KeyError):  # a model without published weights
        return InputSpec(224 if fixed else None, fixed=fixed)
    interp = getattr(t.interpolation, "value", str(t.interpolation))
    return InputSpec(int(t.crop_size[0]) if fixed else None, tuple(map(float, t.mean)), tuple(map(float, t.std)),
                     interp if interp in INTERPOLATIONS else "bilinear", fixed)


def make_backbone(arch: str, state: dict[str, torch.Tensor] | None = None, *,
                  input_size: int | None = None) -> tuple[nn.Module, int, str]:
    """``arch`` without its classifier (``state`` loaded, when given: torchvision's key names),
    the width of the features it then returns, and the name of the classifier it had (its keys
    in a weight file are dropped). ``input_size`` sets a fixed-size (ViT-style) model's size."""
    check_arch(arch)
    if is_timm(arch):
        return _timm_backbone(arch, state, input_size)
    from torchvision.models import get_model

    kwargs = {"image_size": input_size} if input_size and arch.startswith("vit_") else {}
    model = get_model(arch, weights=None, **kwargs)
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
    return model, int(linear.in_features), name


def _timm_backbone(arch: str, state: dict[str, torch.Tensor] | None, input_size: int | None):
    import timm

    name = timm_name(arch)
    kwargs: dict = {"num_classes": 0}
    pc = _timm_cfg(arch)
    if input_size and pc is not None and pc.fixed_input_size:
        kwargs["img_size"] = input_size
    if state is not None:  # timm's own loader: drops the classifier, adapts position embeddings
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"state_dict": state, "file": None, "url": None,
                                                               "hf_hub_id": None})
    model = timm.create_model(name, **kwargs)
    width = int(getattr(model, "head_hidden_size", None) or model.num_features)
    classifier = (pc.classifier if pc is not None else None) or "head"
    return model, width, classifier if isinstance(classifier, str) else classifier[0]


# ---- published weights, from the local cache ------------------------------------------------


def pretrained_state_dict(arch: str) -> tuple[dict[str, torch.Tensor], Path]:
    """``arch``'s published weights and the cached file they came from. timm: the Hugging Face
    hub cache, then torch hub's; torchvision: torch hub's cache file. Never the network: a miss
    is one line naming the file(s) looked for."""
    check_arch(arch)
    if is_timm(arch):
        from affpipe.models.weights import read_weights

        path = timm_cached_weights(arch)
        return read_weights(path), path
    return _imagenet_state_dict(arch), imagenet_cache_file(arch)


def timm_cached_weights(arch: str) -> Path:
    """The cached file of ``timm/NAME``'s pretrained weights; a miss is one line saying what to
    download (nothing is fetched here)."""
    pc = _timm_cfg(arch)
    name = timm_name(arch)
    if pc is None or not (pc.hf_hub_id or pc.url):
        raise ValueError(f"backbone {arch!r}: timm publishes no pretrained weights for it; use --init random "
                         "or --weights FILE")
    looked = []
    if pc.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = pc.hf_hub_id.split("@")[0]
        for filename in [pc.hf_hub_filename] if pc.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            hit = try_to_load_from_cache(repo, filename)
            if isinstance(hit, str):
                return Path(hit)
            looked.append(f"{filename} of {repo} in the Hugging Face cache {_hf_cache_dir()}")
    if pc.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(pc.url).path).name
        if cached.is_file():
            return cached
        looked.append(str(cached))
    raise RuntimeError(
        f"the pretrained weights of timm/{name} are not in the local cache (looked for {'; '.join(looked)}); "
        f"download them where there is network with `python -c \"import timm; timm.create_model('{name}', "
        f"pretrained=True)\"` and copy that machine's Hugging Face cache to {_hf_cache_dir()} (or set "
        "HF_HUB_CACHE to where it is), or pass --weights FILE or --init random"
    )


def _hf_cache_dir() -> str:
    """The Hugging Face hub cache folder looked in (``HF_HUB_CACHE``, else ``HF_HOME/hub``...)."""
    import huggingface_hub.constants as hc

    return str(hc.HF_HUB_CACHE)


def _imagenet_url(arch: str) -> str:
    from torchvision.models import get_model_weights

    check_arch(arch)
    # ResNet-18: IMAGENET1K_V1 (resnet18-f37072fd.pth), the weights the research used.
    return get_model_weights(arch).DEFAULT.url


def imagenet_cache_file(arch: str = "resnet18") -> Path:
    """Where torch hub keeps (and looks for) torchvision's ImageNet weights of ``arch``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(_imagenet_url(arch)).name


def _imagenet_state_dict(arch: str = "resnet18") -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights of ``arch`` from torch hub's cache file only (never the
    network: ``torch.hub.load_state_dict_from_url`` would download on a miss)."""
    url = _imagenet_url(arch)
    cached = imagenet_cache_file(arch)
    if not cached.is_file():
        raise RuntimeError(
            f"the ImageNet {arch} weights are not in the local cache (looked for {cached}; nothing is downloaded). "
            f"Use --init random (recipes: model.init = \"random\"), or fetch {url} where there is network, "
            f"copy it to {cached}, or pass --init PATH with a checkpoint (an affpipe .pt or that torchvision .pth file)."
        )
    try:
        state = torch.load(cached, map_location="cpu", weights_only=True)
    except Exception as exc:  # a partial or corrupt file
        raise RuntimeError(f"could not read the ImageNet {arch} weights {cached} ({type(exc).__name__}: {exc}); "
                           "delete it and copy it again, or use --init random") from exc
    if not isinstance(state, dict):
        raise RuntimeError(f"{cached}: not a state dict; copy torchvision's {Path(url).name} there, or use --init random")
    return state
