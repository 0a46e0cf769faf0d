"""Published weights come from the local cache only: no network attempt anywhere (issue 25)."""

from __future__ import annotations

import shlex
import socket
import sys

import pytest
import torch

from affpipe.models.model import ModelConfig, build_model


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    def refuse(*a, **k):
        pytest.fail("a network attempt")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "setdefaulttimeout", refuse)
    return tmp_path / "hub"


def test_torchvision_imagenet_miss_names_the_file_and_the_override_without_downloading(no_network):
    with pytest.raises(RuntimeError) as err:
        build_model(ModelConfig(init="imagenet"))
    msg = str(err.value)
    assert "\n" not in msg and str(no_network / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "--init random" in msg and 'model.init = "random"' in msg and "nothing is downloaded" in msg


def test_timm_miss_names_the_real_cache_folder(no_network, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(RuntimeError) as err:
        build_model(ModelConfig(arch="timm/mobilenetv3_small_050", init="imagenet"))
    assert str(tmp_path / "hf") in str(err.value) and "~/.cache" not in str(err.value)


def test_grid_imagenet_check_is_cache_only(no_network):
    from affpipe.experiments.grid import imagenet_available

    ok, why = imagenet_available()
    assert not ok and "resnet18-f37072fd.pth" in why
    (no_network / "checkpoints").mkdir(parents=True)
    (no_network / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"x")
    assert imagenet_available() == (True, "")


def test_conversion_command_runs_this_interpreter(tmp_path):
    from affpipe.models.weights import conversion_command

    assert shlex.split(conversion_command(tmp_path / "m.pt"))[0] == sys.executable
