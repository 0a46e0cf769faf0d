"""Temporal commands: embed (the feature table temporal heads train on)."""

from __future__ import annotations

from pathlib import Path

import click

from affpipe.cli.main import main


@main.command()
@click.argument("source", required=False)
@click.option("--shards", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Feature table folder (several backbones: one table per OUT/<name>).")
@click.option("--split", type=click.Choice(["all", "train", "val", "test"]), default="all")
@click.option("--backbone", multiple=True, help="With SOURCE=imagenet or --weights: a torchvision classification "
              "model (resnet18) or timm/NAME; repeated: several backbones in one pass over the frames.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help="Instead of SOURCE: the backbone's weights, a .safetensors file or a torch.save'd state dict "
                   "(one per --backbone).")
@click.option("--image-size", type=click.IntRange(min=1), default=None, help="Default: the checkpoint's (112 for imagenet).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256)
@click.option("--backend", type=click.Choice(["auto", "dali", "torch"]), default="auto", help="Loader backend.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--num-workers", type=click.IntRange(min=0), default=None, help="Loader threads/processes.")
@click.option("--overwrite", is_flag=True,
              help="OUT was started from other inputs: delete embed's own files there and start afresh.")
def embed(source: str | None, shards: Path, out: Path, split: str, backbone: tuple[str, ...],
          weights: tuple[Path, ...], image_size: int | None, batch_size: int, backend: str, device: str,
          num_workers: int | None, overwrite: bool) -> None:
    """Encode every frame of SHARDS with a frozen backbone into a feature table (Arrow IPC).

    SOURCE: a per-frame run folder or checkpoint, or `imagenet` (the backbone's published weights);
    or no SOURCE and --weights FILE. Several --backbone: one table each, every frame decoded once.
    Resumable per shard: rerun the same command after a kill (another SOURCE into the same OUT is
    refused; see --overwrite).
    """
    from affpipe.loaders import LoaderConfig
    from affpipe.runs.embed import EmbedConfig
    from affpipe.runs.embed import embed as run_embed

    if (source is None) == (not weights):
        raise click.UsageError("give SOURCE (a run, a checkpoint or imagenet) or --weights FILE, one of the two")
    result = run_embed(EmbedConfig(source=source or "weights", weights=weights or None, shards=shards, out=out,
                                   split=split, backbone=backbone or None, image_size=image_size, batch_size=batch_size,
                                   device=device, overwrite=overwrite,
                                   loader=LoaderConfig(backend=backend, num_workers=num_workers)))
    for manifest in result.get("tables", [result]):
        click.echo(embed_summary(manifest))
    tp = result.get("tables", [result])[-1]["throughput"]
    if tp["frames_per_s"] is not None:
        click.echo(f"{tp['frames']} frames embedded at {tp['frames_per_s']:.0f} frames/s on {tp['device']}, "
                   f"data wait {tp['data_wait_share']:.1%} of the time → {out}")


def embed_summary(manifest: dict) -> str:
    """One line a person reads: rows per split, width, backbone, image size."""
    splits = manifest.get("splits")
    per = (", ".join(f"{k} {v}" for k, v in splits.items()) if isinstance(splits, dict)
           else ", ".join(map(str, splits or ())))
    return (f"{manifest['rows']} frames ({per}) → {manifest['feature_dim']}-wide features of "
            f"{manifest['backbone']} at {manifest['image_size']} px")
