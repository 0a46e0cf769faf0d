"""Counting the host syncs of a piece of code: the ops that make the CPU wait for the GPU.

On a GPU the host queues work and runs ahead; reading a value back (``.item()``, ``bool(t)``,
``float(t)``, ``.tolist()``, ``.cpu()``) or an op whose output size depends on the data
(``nonzero``, boolean-mask indexing, ``unique``) waits for everything queued before it. The
training hot path (a loader's per-batch work, ``Trainer.step``, the logging between log points)
must make none; ``HostSyncCounter`` counts them, naming where each happened.

It is a ``TorchDispatchMode``: it sees every aten op under it and counts those that read data
of the watched ``device`` on the host. A CPU-only machine checks it with ``device="meta"`` as
the training device: meta tensors have shapes but no data, so host tensors (CPU) and "device"
tensors (meta) stay apart as on a GPU, and the ops are cheap. There the counter stands in for
the values a sync would read (ones), so the code runs on to the next one.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten

# Ops that read a device value on the host, or whose output shape depends on device data.
_SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t) of one element
    aten.is_nonzero.default,  # bool(t)
    aten.equal.default,  # torch.equal
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.bincount.default,  # sizes its output by the largest value
}
_MASK_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}  # bool masks → nonzero
_COPY_OPS = {aten._to_copy.default, aten.copy_.default}


@dataclass
class Sync:
    """One counted sync: the op and the innermost affpipe frame that caused it."""

    op: str
    where: str


def _affpipe_frame() -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/affpipe/" in frame.filename.replace("\\", "/") and not frame.filename.endswith("host_sync.py"):
            return f"{frame.filename.split('/affpipe/')[-1]}:{frame.lineno} {frame.name}"
    return "?"


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter("cuda") as c: ...`` then ``c.syncs`` (``Sync`` list) / ``c.count``."""

    def __init__(self, device: str | torch.device = "meta") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.syncs: list[Sync] = []

    @property
    def count(self) -> int:
        return len(self.syncs)

    def _on_device(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == self.device.type

    def _is_sync(self, func, args, kwargs) -> bool:
        flat, _ = tree_flatten((args, kwargs))
        if not any(self._on_device(t) for t in flat):
            return False
        if func in _SYNC_OPS:
            return True
        if func is aten.repeat_interleave.Tensor:
            return kwargs.get("output_size") is None  # else it sums the repeats on the host
        if func in _MASK_INDEX_OPS:
            return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in tree_flatten(args[1])[0])
        if func is aten._to_copy.default:
            return self._on_device(args[0]) and torch.device(kwargs.get("device") or args[0].device).type == "cpu"
        if func is aten.copy_.default:
            return args[0].device.type == "cpu" and self._on_device(args[1])
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._is_sync(func, args, kwargs):
            return func(*args, **kwargs)
        self.syncs.append(Sync(str(func.overloadpacket.__name__), _affpipe_frame()))
        if self.device.type != "meta":
            return func(*args, **kwargs)
        return self._stand_in(func, args, kwargs)

    def _stand_in(self, func, args, kwargs):
        """Run the op on host ones in place of the meta data (meta has none to read)."""
        host = tree_map(lambda t: torch.ones(t.shape, dtype=t.dtype) if self._on_device(t) else t, (args, kwargs))
        out = func(*host[0], **host[1])
        if func in _COPY_OPS or not isinstance(out, torch.Tensor):
            return out
        if func._schema.is_mutable:  # in place on a meta tensor: it holds no data to change
            return args[0]
        return out.to("meta")


def format_syncs(syncs: list[Sync]) -> str:
    """One line per sync, for an assertion message."""
    return "\n".join(f"  {s.op} at {s.where}" for s in syncs) or "  (none)"
