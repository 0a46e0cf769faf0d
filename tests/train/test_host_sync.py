"""The GPU hot path makes no host sync: a loader's per-batch work, ``Trainer.step`` and the
logging between log points, run with ``meta`` as the training device under ``HostSyncCounter``
(host tensors stay on the CPU, "device" tensors on meta, as on a GPU).

The only syncs allowed are at the documented points: ``RunLog.flush`` (one per log line and per
checkpoint, ``vec.tolist()``) — and the counter must catch a deliberately added ``.item()``.
"""

from __future__ import annotations

import pytest
import torch
from host_sync import HostSyncCounter, format_syncs

from affpipe.dist import DistContext
from affpipe.loaders import make_loader

META = torch.device("meta")


def test_counter_counts_reads_copies_and_masks_of_device_tensors_only():
    x = torch.randn(4, 3, device=META)
    with HostSyncCounter(META) as c:
        y = x * 2 + 1  # queued work: no sync
        y.sum().item()
        bool((y > 0).any())
        y.cpu()
        y.tolist()
        y[y > 0]
        torch.nonzero(y)
        torch.ones(3).sum().item()  # a host tensor: no sync
        torch.ones(3).to(META)  # host → device: no sync
    assert [s.op for s in c.syncs] == ["_local_scalar_dense", "_local_scalar_dense", "_to_copy", "_to_copy",
                                       "index", "nonzero"], format_syncs(c.syncs)


def _batches(shard_dir, backend: str, n: int, device: torch.device = META, **kw) -> tuple[int, list]:
    loader = make_loader(shard_dir, "train", batch_size=8, train=True, backend=backend, device=device, num_workers=1,
                         seed=0, **kw)
    it = iter(loader)
    with HostSyncCounter(device) as c:
        batches = [next(it) for _ in range(n)]
    if hasattr(loader, "close"):
        loader.close()
    return c, batches


BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.dali)]
DEVICES = [META, pytest.param(torch.device("cuda", 0), marks=pytest.mark.gpu, id="cuda")]


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_per_batch_path_makes_no_sync(shard_dir, backend, normalize, device):
    c, batches = _batches(shard_dir, backend, 3, device, normalize=normalize)
    assert c.count == 0, format_syncs(c.syncs)
    b = batches[0]
    assert b.va.device.type == device.type and b.au_mask.device.type == device.type and len(b) == 8
    assert b.images.dtype == (torch.float32 if normalize else torch.uint8)


def test_counter_catches_a_version_check_on_the_device(shard_dir, monkeypatch):
    """The per-batch record version check the loaders used to make on the device is caught."""
    import affpipe.batch as batch_mod

    original = batch_mod.decode_label_tensor

    def checking(raw):
        bool((raw[:, 30] != 1).any())  # the old check's read: a device sync per batch
        return original(raw)

    monkeypatch.setattr(batch_mod, "decode_label_tensor", checking)
    c, _ = _batches(shard_dir, "torch", 2)
    assert [s.op for s in c.syncs] == ["_local_scalar_dense"] * 2, format_syncs(c.syncs)


# ---- Trainer.step and the logging between log points ----------------------------------------


def _meta_run(shard_dir, index_dir, tmp_path, steps: int = 7, log_every: int = 3, ckpt_every: int = 4,
              device: torch.device = META):
    """``train_one_epoch`` on meta (or a GPU): the trainers' model, batches from the torch loader
    (made beforehand)."""
    from affpipe.index.build import load_index
    from affpipe.run.config import load_config
    from affpipe.scoring.tasks import label_statistics
    from affpipe.train.loop import RunLog, train_one_epoch
    from affpipe.train.trainer import Trainer

    cfg = load_config(None, {"task": "mtl", "shards": shard_dir, "out": tmp_path, "epochs": 1, "batch_size": 8,
                             "image_size": 32, "device": "cpu", "log_every": log_every, "ckpt_every": ckpt_every})
    table, _ = load_index(index_dir)
    ctx = DistContext(rank=0, world=1, device=device)
    trainer = Trainer.build(cfg, ctx, label_statistics(table))  # on CUDA: bf16 autocast, channels_last
    _, batches = _batches(shard_dir, "torch", steps, device, image_size=32, normalize=False)
    checkpoints = []

    def checkpoint(name: str) -> None:
        checkpoints.append(trainer.state.step)
        trainer.state_dict()

    runlog = RunLog(tmp_path, ctx, sync=False)
    with HostSyncCounter(device) as counter:
        train_one_epoch(trainer, batches, steps, runlog, checkpoint)
    return counter, checkpoints, trainer


def _assert_only_at_log_points(counter: HostSyncCounter, expected_flushes: int) -> None:
    outside = [s for s in counter.syncs if "loop.py" not in s.where or "flush" not in s.where]
    assert not outside, "host syncs outside the log points:\n" + format_syncs(outside)
    assert counter.count == expected_flushes, format_syncs(counter.syncs)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_train_step_and_logging_sync_only_at_log_points(shard_dir, index_dir, tmp_path, device):
    counter, checkpoints, trainer = _meta_run(shard_dir, index_dir, tmp_path, device=device)
    assert trainer.state.step == 7 and checkpoints == [4]
    # log lines at steps 3, 4 (the checkpoint flushes first) and 7 (the epoch's end): one sync each
    _assert_only_at_log_points(counter, expected_flushes=3)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_counter_catches_an_item_added_to_the_step(shard_dir, index_dir, tmp_path, monkeypatch):
    from affpipe.train.trainer import Trainer

    original = Trainer.step

    def step_with_item(self, batch):
        parts = original(self, batch)
        parts["loss"].item()  # the kind of line that costs a GPU its run-ahead
        return parts

    monkeypatch.setattr(Trainer, "step", step_with_item)
    counter, _, _ = _meta_run(shard_dir, index_dir, tmp_path)
    with pytest.raises(AssertionError, match="outside the log points"):
        _assert_only_at_log_points(counter, expected_flushes=3)
    assert counter.count == 3 + 7


def test_batch_to_cpu_blocks_and_to_a_device_does_not(monkeypatch):
    """A device→host copy read before its stream reaches it sees stale memory: ``Batch.to("cpu")``
    waits by default; copies to an accelerator stay asynchronous."""
    from affpipe.batch import make_batch

    raw = torch.zeros(2, 32, dtype=torch.uint8)
    raw[:, 30] = 1  # RECORD_VERSION
    batch = make_batch(torch.zeros(2, 3, 4, 4), raw)
    calls = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking"))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    batch.to("cpu")
    assert calls and not any(calls)
    calls.clear()
    batch.to(META)
    assert calls and all(calls)
    calls.clear()
    batch.to("cpu", non_blocking=True)  # asked for explicitly
    assert all(calls)


def test_counter_counts_data_dependent_sizes():
    x = torch.ones(4, dtype=torch.long, device=META)
    with HostSyncCounter(META) as c:
        torch.bincount(x)
        torch.repeat_interleave(x)
        torch.repeat_interleave(x, output_size=4)  # sized by the caller: no sync
    assert [s.op for s in c.syncs] == ["bincount", "repeat_interleave"], format_syncs(c.syncs)
