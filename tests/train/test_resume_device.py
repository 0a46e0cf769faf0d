"""Resuming on the training device: ``loop.resume`` loads ``last.pt`` with ``map_location`` set
to the device, so on a GPU the RNG state tensors arrive as CUDA tensors, which ``.numpy()``
refuses. On a CPU the same path runs with the RNG tensors replaced by stand-ins that refuse
host reads as a CUDA tensor does (only ``.cpu()`` gives a host tensor)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from affpipe.dist import DistContext


class DeviceTensor(torch.Tensor):
    """A tensor that behaves like one on a CUDA device for host reads."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")

    def cpu(self, *args, **kwargs):
        return torch.Tensor.cpu(self, *args, **kwargs).as_subclass(torch.Tensor)


def _on_device(obj):
    if isinstance(obj, torch.Tensor):
        return obj.as_subclass(DeviceTensor)
    if isinstance(obj, dict):
        return {k: _on_device(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_on_device(v) for v in obj)
    return obj


def test_stand_in_refuses_numpy_like_cuda():
    t = _on_device(torch.arange(3))
    with pytest.raises(TypeError, match="cuda"):
        t.numpy()
    assert t.cpu().numpy().tolist() == [0, 1, 2]


def test_resume_restores_rng_states_loaded_onto_the_device(index_dir, tmp_path, monkeypatch):
    from affpipe.index.build import load_index
    from affpipe.run.checkpoint import load_checkpoint, save_checkpoint
    from affpipe.run.config import load_config
    from affpipe.scoring.tasks import label_statistics
    from affpipe.train import loop
    from affpipe.train.trainer import Trainer

    cfg = load_config(None, {"task": "va", "shards": tmp_path, "out": tmp_path, "image_size": 32, "device": "cpu"})
    ctx = DistContext(rank=0, world=1, device=torch.device("cpu"))
    trainer = Trainer.build(cfg, ctx, label_statistics(load_index(index_dir)[0]))
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    save_checkpoint(tmp_path / "last.pt", trainer.state_dict())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)

    seen = {}

    def load_onto_device(path, map_location="cpu"):
        seen["map_location"] = map_location
        # a non-default map_location (a callable, as torch.load accepts), then the RNG tensors
        # as they arrive on a GPU
        ckpt = load_checkpoint(path, map_location=lambda storage, _loc: storage)
        ckpt["rng"] = _on_device(ckpt["rng"])
        return ckpt

    monkeypatch.setattr(loop, "load_checkpoint", load_onto_device)
    assert loop.resume(trainer, tmp_path)
    assert seen["map_location"] == ctx.device  # the checkpoint goes to the training device
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.gpu
def test_kill_free_resume_on_cuda(shard_dir, tmp_path):
    """A run trained on the GPU continues from its last.pt on the GPU (RNG states included)."""
    from affpipe.run.checkpoint import load_checkpoint
    from affpipe.run.config import load_config
    from affpipe.runs.train import train

    base = {"task": "mtl", "shards": shard_dir, "out": tmp_path / "run", "image_size": 32, "batch_size": 16,
            "max_steps_per_epoch": 3, "max_val_steps": 3, "loader.num_workers": 1, "loader.backend": "torch",
            "device": "cuda", "log_every": 1}
    train(load_config(None, {**base, "epochs": 1}))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["rng"]["cuda"]
    train(load_config(None, {**base, "epochs": 2, "resume": True}))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2
