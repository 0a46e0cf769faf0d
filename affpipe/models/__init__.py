"""The model zoo: backbones (torchvision, ``timm/NAME``), task heads and the input op
(``model``), published weights from the local caches (``backbones``), weight files (``weights``)."""

from affpipe.models.model import HEAD_OUTPUTS, ModelConfig, build_model

__all__ = ["HEAD_OUTPUTS", "ModelConfig", "build_model"]
