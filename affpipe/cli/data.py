"""Data commands: synth, index, stats, shard, verify, show."""

from __future__ import annotations

from pathlib import Path

import click

from affpipe.cli.main import main

# ---- synth ---------------------------------------------------------------------------------


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--layout", type=click.Choice(["abaw1", "abaw2", "abaw3", "abaw5", "abaw6"]), default="abaw6",
              help="ABAW edition whose folder and header conventions to follow (abaw1: the 2020 "
                   "Training_Set naming and 8-AU header).")
@click.option("--videos", type=click.IntRange(min=1), default=None,
              help="Number of videos [default: 24; 560 with --full-scale].")
@click.option("--frames", type=click.IntRange(min=10), default=None,
              help="Mean frames per video [default: 300; 5200 with --full-scale].")
@click.option("--seed", type=int, default=0, help="Same seed, same bytes.")
@click.option("--mtl", is_flag=True, help="Also write the s-Aff-Wild2 MTL files.")
@click.option("--test-videos", type=click.IntRange(min=0), default=0,
              help="Test-set videos: crops, no annotation, named in the edition's test lists.")
@click.option("--full-scale", is_flag=True,
              help="Aff-Wild2's size (~2.9M frames): a rendered face pool hard-linked into place; resumable.")
def synth(out: Path, layout: str, videos: int | None, frames: int | None, seed: int, mtl: bool,
          test_videos: int, full_scale: bool) -> None:
    """Write a synthetic Aff-Wild2 twin (annotations, face JPEGs, ground truth) under OUT."""
    from affpipe.synth.generate import (
        FULL_SCALE_FRAMES,
        FULL_SCALE_VIDEOS,
        SynthConfig,
        format_summary,
        generate,
    )

    cfg = SynthConfig(
        out=out, layout=layout, seed=seed, mtl=mtl, full_scale=full_scale, test_videos=test_videos,
        videos=videos if videos is not None else (FULL_SCALE_VIDEOS if full_scale else 24),
        frames=frames if frames is not None else (FULL_SCALE_FRAMES if full_scale else 300),
    )
    summary = generate(cfg)
    click.echo(format_summary(summary))


# ---- index / stats -------------------------------------------------------------------------


@main.command("index")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Index folder to write (frames.parquet, videos.parquet, index.json).")
@click.option("--images", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Image root (<video>/<frame>.jpg); repeatable; overrides the automatic search.")
@click.option("--on-bad-line", type=click.Choice(["error", "skip"]), default="error",
              help="Stop at a malformed annotation line, or skip it and count it.")
@click.option("--workers", type=int, default=2, help="Processes for the per-video work.")
@click.option("--test-list", "test_lists", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A test-set list (video names, or a sample/release file of image paths); repeatable; "
                   "added to those found under ROOT.")
@click.option("--overwrite", is_flag=True,
              help="OUT holds an index of other inputs: replace it (deletes only index's own files).")
def index_cmd(root: Path, out: Path, images: tuple[Path, ...], on_bad_line: str, workers: int,
              test_lists: tuple[Path, ...], overwrite: bool) -> None:
    """Find every edition's layout under ROOT and write the label tables to OUT (a new folder, or
    one `affpipe index` wrote: rerun in place with the same inputs)."""
    from affpipe.index.build import IndexConfig, build_index, format_summary

    counts = build_index(IndexConfig(root=root, out=out, images=tuple(images), on_bad_line=on_bad_line,
                                     workers=workers, test_lists=tuple(test_lists), overwrite=overwrite))
    click.echo(format_summary(counts))
    click.echo(f"wrote {out}/frames.parquet, videos.parquet, index.json"
               + (", mtl_frames.parquet" if "mtl" in counts else ""))


@main.command("stats")
@click.argument("index", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for stats.md and the PNGs.")
def stats_cmd(index: Path, out: Path) -> None:
    """Label statistics of an index: stats.md plus class/AU/valence-arousal plots per split."""
    from affpipe.index.stats import write_stats

    md = write_stats(index, out)
    click.echo(f"wrote {md} and its plots")

# ---- shard / verify / show -----------------------------------------------------------------


@main.command()
@click.argument("index", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Shard folder.")
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="all",
              help="test: every frame with a crop, no labels (for predict).")
@click.option("--table", type=click.Choice(["frames", "mtl"]), default="frames", help="frames.parquet or mtl_frames.parquet.")
@click.option("--tasks", default="va,expr,au", help="Keep frames with a valid label in at least one of these.")
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=None, help="Default 50000 (~340 MB shards).")
@click.option("--workers", type=click.IntRange(min=1), default=2)
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the global train shuffle.")
@click.option("--frame-size", type=click.IntRange(min=1), default=None,
              help="Side of the square frames; frames of another size are refused. [default: the size most frames have]")
@click.option("--resize-off-size", is_flag=True, help="Resize (re-encode) frames of another size instead of refusing them.")
@click.option("--overwrite", is_flag=True,
              help="-o holds shards of other inputs: replace them (deletes only affpipe's own shard files).")
@click.option("--unlabelled/--no-unlabelled", default=True, show_default=True,
              help="Also write train/val crops without a label of --tasks, in shards of their own that only "
                   "pre-training reads (supervised loaders never see them).")
def shard(index: Path, out: Path, split: str, table: str, tasks: str, samples_per_shard: int | None,
          workers: int, seed: int, frame_size: int | None, resize_off_size: bool, overwrite: bool, unlabelled: bool) -> None:
    """Pack INDEX's frames into WebDataset shards (+ DALI .idx); resumes a killed run."""
    from affpipe.shards.write import ShardConfig, write_shards

    cfg = ShardConfig(index=index, out=out, split=split, table=table,
                      tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
                      samples_per_shard=samples_per_shard, workers=workers, seed=seed,
                      frame_size=frame_size, resize_off_size=resize_off_size, overwrite=overwrite, unlabelled=unlabelled)
    manifest = write_shards(cfg)
    for name, info in manifest["splits"].items():
        skipped = ", ".join(f"{k} {v}" for k, v in info["skipped"].items())
        unl = info.get("unlabelled")
        extra = f" + {unl['samples']} unlabelled in {len(unl['shards'])} shards" if unl and unl["samples"] else ""
        click.echo(f"{name}: {info['samples']} samples in {len(info['shards'])} shards{extra}, "
                   f"{info['bytes'] / 1e6:.1f} MB; skipped: {skipped}")
    click.echo(f"manifest: {out / 'manifest.json'}")


@main.command()
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--decode", is_flag=True, help="Also decode every JPEG.")
@click.option("--index", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Label index to check against (default: the one in the manifest).")
def verify(shards: Path, decode: bool, index: Path | None) -> None:
    """Re-read every shard in SHARDS: checksums, counts, .idx offsets, labels against the table."""
    from affpipe.shards import verify_shards
    from affpipe.shards.format import read_manifest

    problems = verify_shards(shards, decode=decode, index=index)
    for p in problems:
        click.echo(p, err=True)
    if problems:
        raise SystemExit(1)
    for name, info in read_manifest(shards).get("splits", {}).items():
        unl = info.get("unlabelled")
        extra = f" + {unl['samples']} unlabelled" if unl and unl.get("samples") else ""
        click.echo(f"{name}: {info['samples']} samples in {len(info['shards'])} shards{extra}")
    click.echo(f"{shards}: all shards OK{' (every JPEG decoded)' if decode else ''}")


@main.command()
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--png", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output PNG.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default=None, help="Default: all splits.")
@click.option("--n", type=click.IntRange(min=1), default=36, help="Number of samples.")
@click.option("--seed", type=click.IntRange(min=0), default=0)
def show(shards: Path, png: Path, split: str | None, n: int, seed: int) -> None:
    """A grid of random samples from SHARDS with their labels written on them."""
    from affpipe.shards import write_grid

    click.echo(str(write_grid(shards, png, n=n, seed=seed, split=split)))
