"""Where this process runs: torchrun's environment, usable cores, the device, process groups.

The only module that reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``.
torch is imported inside the functions that need it, so the benchmarks' bare-host scripts
can import this module cheaply.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any


def dist_env(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the arguments when given, else torchrun's ``RANK``/``WORLD_SIZE``."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, world_size={world})")
    return rank, world


def local_rank() -> int:
    """This process's GPU index on its node (torchrun's ``LOCAL_RANK``; 0 alone)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # macOS, Windows


def default_workers() -> int:
    """CPU threads/processes for one rank: the usable cores split over the ranks of this node."""
    return max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def pick_device(name: str = "auto") -> Any:
    """``auto`` → this rank's CUDA device when there is one, else CPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA device is available (use --device cpu)")
        return torch.device("cuda", local_rank())
    if name != "cpu" and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def autocast(device: Any, amp: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA; a no-op elsewhere or with ``amp="none"``."""
    import torch

    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@dataclass
class DistContext:
    """This process's place in a (possibly single-process) run."""

    rank: int
    world: int
    device: Any
    owns_group: bool = False  # setup() initialized the process group, so teardown() ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> DistContext:
    """Pick the device and, under torchrun with more than one process, join the process group."""
    import torch
    import torch.distributed as tdist

    rank, world = dist_env()
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = world > 1 and not tdist.is_initialized()
    if owns:
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank=rank, world=world, device=dev, owns_group=owns)


def teardown(ctx: DistContext) -> None:
    """Wait for every rank, and end the process group when ``setup`` started it."""
    import torch.distributed as tdist

    if ctx.distributed:
        tdist.barrier()
        if ctx.owns_group:
            tdist.destroy_process_group()
