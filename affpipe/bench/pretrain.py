"""The pre-training case of ``affpipe bench``: the data-wait share of a pre-training step.

A SimSiam step on ResNet-18 (the recipe's published heads: ``pipelines/pretrain_simsiam.toml``)
fed two augmented 112 px views of every frame by the pre-training loader
(``affpipe.loaders.pretrain``: the CPU decode threads; DALI on a GPU when it is importable), and
the same step on synthetic views (the compute ceiling). The data wait is the time a step spends
blocked on the loader's next batch, as for the supervised cases (``affpipe.bench.common.measure``);
the design's target is under 5% of a step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from affpipe.bench.common import Endless, machine_line, measure
from affpipe.loaders.factory import make_pretrain_loader
from affpipe.loaders.pretrain import PretrainData, ViewBatch
from affpipe.pretrain import default_recipe, make_method, make_optimizer
from affpipe.shards.unlabelled import frame_counts

log = logging.getLogger(__name__)

TARGET_WAIT_SHARE = 0.05


def _step(method, optimizer, device: torch.device) -> Callable[[ViewBatch], None]:
    def run(batch: ViewBatch) -> None:
        out = method.loss(batch.views)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()

    return run


def bench_pretrain(shards: Path, *, device: str, batch_size: int = 64, image_size: int = 112, seed: int = 0,
                   warmup: int = 2, max_steps: int = 20, seconds: float = 10.0, repeats: int = 3,
                   num_workers: int | None = None, arch: str = "resnet18") -> dict:
    """Frames/s and data-wait share of a pre-training step fed by the loader, and on synthetic views
    (``arch``: the backbone; the tests use a tiny one)."""
    from affpipe._optional import dali_available

    dev = torch.device(device)
    recipe = default_recipe("simsiam")
    views = tuple(dataclasses.replace(v, size=image_size) for v in recipe.views)
    recipe = dataclasses.replace(recipe, arch=arch, image_size=image_size, batch_size=batch_size, views=views)
    torch.manual_seed(seed)
    method = make_method(recipe).to(dev)
    step = _step(method, make_optimizer(method, recipe), dev)
    backend = "dali" if dev.type == "cuda" and dali_available() else "torch"
    counts = frame_counts(shards).get("train", {})
    row = {"name": "pretrain-simsiam", "method": "simsiam", "arch": recipe.arch, "views": len(views),
           "image_size": image_size, "batch_size": batch_size, "backend": backend, "device": dev.type,
           "frames": counts, "target_wait_share": TARGET_WAIT_SHARE}
    bench = dict(warmup=warmup, max_steps=max_steps, seconds=seconds, repeats=repeats, device=dev)
    g = torch.Generator().manual_seed(seed)
    synthetic = ViewBatch([torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8,
                                         generator=g).to(dev) for _ in views], torch.arange(batch_size))

    def synthetic_step() -> tuple[int, float]:
        step(synthetic)
        return batch_size, 0.0

    row["synthetic_fps"] = round(measure(synthetic_step, **bench).steady_rate, 1)
    loader = make_pretrain_loader(shards, PretrainData(), views=views, batch_size=batch_size, seed=seed,
                                  backend=backend, device=dev, num_workers=num_workers)
    it = Endless(loader)

    def fed_step() -> tuple[int, float]:
        t0 = time.perf_counter()
        b = next(it).to(dev)
        wait = time.perf_counter() - t0
        step(b)
        return len(b), wait

    fed_step.source = it

    def loader_only() -> tuple[int, float]:
        return len(next(it)), 0.0

    loader_only.source = it
    try:
        row["loader_fps"] = round(measure(loader_only, **{**bench, "max_steps": 50}).steady_rate, 1)
        m = measure(fed_step, **bench)
    finally:
        if hasattr(loader, "close"):
            loader.close()
    row.update(m.to_dict(), data_wait_share=round(m.wait_share, 4))
    row["met"] = m.wait_share < TARGET_WAIT_SHARE
    row["ratio_vs_synthetic"] = round(m.steady_rate / row["synthetic_fps"], 3) if row["synthetic_fps"] else None
    return row


def pretrain_markdown(row: dict, machine: dict) -> str:
    """The BENCHMARKS.md section of the pre-training case."""
    share = row.get("data_wait_share")
    lines = [
        f"SimSiam step on {row['arch']} (published projector 2048 / predictor 512), {row['views']} views of "
        f"{row['image_size']} px a frame, batch {row['batch_size']}, {row['device']}, loader backend "
        f"`{row['backend']}`; train split: {row['frames'].get('labelled', 0)} labelled + "
        f"{row['frames'].get('unlabelled', 0)} unlabelled frames.",
        "",
        "| case | frames/s | data wait (share of the step) | target |",
        "|---|---:|---:|---:|",
        f"| fed by the pre-training loader | {row.get('fps')} | {share:.1%} | < {row['target_wait_share']:.0%} "
        f"({'met' if row.get('met') else 'NOT met'}) |" if share is not None else "| fed by the loader | error | | |",
        f"| synthetic views (compute ceiling) | {row.get('synthetic_fps')} | 0 | |",
        f"| the loader alone (two views a frame, no step) | {row.get('loader_fps')} | | |",
        "",
        f"Machine: {machine_line(machine)}" + (f" — {machine['note']}" if machine.get("note") else "") + ".",
    ]
    return "\n".join(lines)
