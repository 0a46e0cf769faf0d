"""Item 1 of issue 12: loading a checkpoint never runs code from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


class _Payload:
    """Unpickling this object would create ``marker`` (what a hostile checkpoint could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _hostile(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pt"
    torch.save({"model": {"backbone.conv1.weight": torch.zeros(1)}, "config": {}, "x": _Payload(marker)}, path)
    return path, marker


def test_init_from_hostile_checkpoint_is_refused(tmp_path):
    from affpipe.models.model import ModelConfig, build_model

    path, marker = _hostile(tmp_path)
    with pytest.raises(ValueError, match=r"refused: .*weights_only=True"):
        build_model(ModelConfig(tasks=("va",), init=str(path)))
    assert not marker.exists()


def test_load_checkpoint_refuses_hostile_and_non_checkpoint_files(tmp_path):
    from affpipe.run.checkpoint import load_checkpoint

    path, marker = _hostile(tmp_path)
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    text = tmp_path / "notes.pt"
    text.write_text("epoch 3: 0.41\n")  # torch.load's legacy path raised a bare KeyError: 101
    with pytest.raises(ValueError, match=r"notes\.pt: refused"):
        load_checkpoint(text)
    plain = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), plain)
    with pytest.raises(ValueError, match="not an affpipe checkpoint"):
        load_checkpoint(plain)


# ---- issue 24: a truncated file is damage, not a security refusal --------------------------


@pytest.mark.parametrize("cut", [0.5, 100, -10])
@pytest.mark.parametrize("reader", ["checkpoint", "weight file"])
def test_a_truncated_checkpoint_is_called_truncated_not_refused(tmp_path, cut, reader):
    from affpipe.models.weights import read_weights
    from affpipe.run.checkpoint import load_checkpoint

    whole = tmp_path / "best.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "config": {}}, whole)
    data = whole.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut % len(data)
    (tmp_path / "cut.pt").write_bytes(data[:n])
    load = load_checkpoint if reader == "checkpoint" else read_weights
    with pytest.raises(ValueError, match=rf"cut\.pt: truncated or corrupt {reader} \({n} bytes") as err:
        load(tmp_path / "cut.pt")
    assert "refused" not in str(err.value) and "run code" not in str(err.value)
