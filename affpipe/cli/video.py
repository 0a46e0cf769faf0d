"""Input commands: crop (raw videos or photos → an Aff-Wild2-shaped tree of aligned crops)."""

from __future__ import annotations

from pathlib import Path

import click

from affpipe.cli.main import main


@main.command("crop")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Tree to write: cropped_aligned/<video>/NNNNN.jpg and crop_tables/<video>.parquet.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", help="Where MTCNN runs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, help="Frames per detector batch.")
@click.option("--detect-size", type=click.IntRange(min=32), default=640,
              help="Longest side of the frame the detector sees (crops are cut from the full-resolution frame).")
@click.option("--min-face", type=click.IntRange(min=8), default=20, help="Smallest face, pixels of the detector's frame.")
@click.option("--min-score", type=click.FloatRange(0, 1), default=0.9, help="Faces below this detection score are ignored.")
@click.option("--min-track", type=click.IntRange(min=1), default=8, help="Tracks shorter than this many frames are dropped (counted).")
@click.option("--max-gap", type=click.IntRange(min=1), default=25, help="Frames a track may miss and continue.")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=95)
@click.option("--workers", type=click.IntRange(min=0), default=0, help="Align/encode threads (0 = usable cores).")
@click.option("--overwrite", is_flag=True, help="OUT holds crops of other inputs: replace them (deletes only crop's own files).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def crop_cmd(inputs: tuple[Path, ...], out: Path, no_progress: bool, **kw) -> None:
    """Detect, track and align the faces of VIDEO files (or folders of videos or photos) into OUT,
    an Aff-Wild2-shaped tree that `affpipe index` reads (videos without annotations are split test)."""
    from affpipe.video import CropConfig, crop, format_summary

    summary = crop(CropConfig(inputs=tuple(inputs), out=out, progress=not no_progress, **kw))
    click.echo(format_summary(summary))
    click.echo(f"wrote {out}/cropped_aligned/ and {out}/crop_tables/")
