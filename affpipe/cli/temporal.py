"""Temporal commands: embed (the feature table temporal heads train on)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from affpipe.cli.main import main


@main.command()
@click.argument("source", required=False)
@click.option("--shards", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Feature table folder.")
@click.option("--split", type=click.Choice(["all", "train", "val", "test"]), default="all")
@click.option("--backbone", default=None, help="With SOURCE=imagenet or --weights: a torchvision classification "
              "model (resnet18) or timm/NAME.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Instead of SOURCE: the backbone's weights, a .safetensors file or a torch.save'd state dict.")
@click.option("--image-size", type=click.IntRange(min=1), default=None, help="Default: the checkpoint's (112 for imagenet).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256)
@click.option("--backend", type=click.Choice(["auto", "dali", "torch"]), default="auto", help="Loader backend.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--num-workers", type=click.IntRange(min=0), default=None, help="Loader threads/processes.")
def embed(source: str | None, shards: Path, out: Path, split: str, backbone: str | None, weights: Path | None,
          image_size: int | None, batch_size: int, backend: str, device: str, num_workers: int | None) -> None:
    """Encode every frame of SHARDS with a frozen backbone into a feature table (Arrow IPC).

    SOURCE: a per-frame run folder or checkpoint, or `imagenet` (the backbone's published weights);
    or no SOURCE and --weights FILE. Resumable per shard: rerun the same command after a kill.
    """
    from affpipe.loaders import LoaderConfig
    from affpipe.temporal.embed import EmbedConfig
    from affpipe.temporal.embed import embed as run_embed

    if (source is None) == (weights is None):
        raise click.UsageError("give SOURCE (a run, a checkpoint or imagenet) or --weights FILE, one of the two")
    manifest = run_embed(EmbedConfig(source=source or "weights", weights=weights, shards=shards, out=out, split=split, backbone=backbone,
                                     image_size=image_size, batch_size=batch_size, device=device,
                                     loader=LoaderConfig(backend=backend, num_workers=num_workers)))
    tp = manifest["throughput"]
    click.echo(json.dumps({k: manifest[k] for k in ("rows", "feature_dim", "backbone", "image_size", "splits")}))
    if tp["frames_per_s"] is not None:
        click.echo(f"{tp['frames']} frames embedded at {tp['frames_per_s']:.0f} frames/s on {tp['device']}, "
                   f"data wait {tp['data_wait_share']:.1%} of the time → {out}")
