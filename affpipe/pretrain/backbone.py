"""The backbone a pre-training method trains: the per-frame trainer's, built the same way.

``resnet18`` (any torchvision classification model) without its classifier, or ``timm/NAME``
with ``num_classes=0``: the modules ``affpipe.models.backbones.make_backbone`` builds, so the
state dict a method returns (``backbone_state_dict()``) loads into the per-frame backbone with
``--weights FILE`` / ``--init FILE`` unchanged (same key names, no classifier keys). This stage
sits below ``train`` and cannot import it; the tests check the two stay in step.
"""

from __future__ import annotations

from torch import nn

TIMM_PREFIX = "timm/"  # as affpipe.models.backbones spells timm's models


def build_backbone(arch: str, image_size: int) -> tuple[nn.Module, int]:
    """``arch`` without its classifier, and the width of the features it returns."""
    if arch.startswith(TIMM_PREFIX):
        import timm

        name = arch[len(TIMM_PREFIX):]
        if not name or not timm.is_model(name.split(".")[0]):
            raise ValueError(f"backbone {arch!r}: timm has no model {name!r}")
        kwargs: dict = {"num_classes": 0}
        # the per-frame trainer's rule (train.backbones._timm_backbone): a fixed-size model gets image_size
        cfg = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(name.split(".")[0])
        if cfg is not None and cfg.fixed_input_size:
            kwargs["img_size"] = image_size
        model = timm.create_model(name, **kwargs)
        return model, int(getattr(model, "head_hidden_size", None) or model.num_features)
    from torchvision.models import get_model, list_models

    if arch not in list_models():
        raise ValueError(f"backbone {arch!r} is not a torchvision classification model (timm's as timm/NAME)")
    model = get_model(arch, weights=None)
    last = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"backbone {arch!r}: no final nn.Linear classifier to remove")
    name, linear = last[-1]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return model, int(linear.in_features)


def is_vit(model: nn.Module) -> bool:
    """A timm ``VisionTransformer`` (patch embedding, position embedding, blocks): what MAE masks."""
    return all(hasattr(model, a) for a in ("patch_embed", "pos_embed", "blocks", "norm", "_pos_embed"))
