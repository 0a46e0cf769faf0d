"""The backbone a pre-training method trains: the per-frame trainer's, built the same way.

``resnet18`` (any torchvision classification model) without its classifier, or ``timm/NAME``
with ``num_classes=0``: the modules ``affpipe.models.backbones.make_backbone`` builds, so the
state dict a method returns (``backbone_state_dict()``) loads into the per-frame backbone with
``--weights FILE`` / ``--init FILE`` unchanged (same key names, no classifier keys).
"""

from __future__ import annotations

from torch import nn


def build_backbone(arch: str, image_size: int) -> tuple[nn.Module, int]:
    """``arch`` without its classifier, and the width of the features it returns: exactly the
    per-frame trainer's backbone (``affpipe.models.backbones.make_backbone``), so what a method
    learns loads there unchanged."""
    from affpipe.models.backbones import make_backbone

    model, width, _ = make_backbone(arch, input_size=image_size)
    return model, int(width)


def is_vit(model: nn.Module) -> bool:
    """A timm ``VisionTransformer`` (patch embedding, position embedding, blocks): what MAE masks."""
    return all(hasattr(model, a) for a in ("patch_embed", "pos_embed", "blocks", "norm", "_pos_embed"))
