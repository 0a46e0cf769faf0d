"""Benchmark and study commands: bench, bench-full, report, experiments."""

from __future__ import annotations

from pathlib import Path

import click

from affpipe.cli.main import main

# ---- bench ---------------------------------------------------------------------------------


@main.command()
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: results.json, loaders.png, cache/ (the synthetic data, reused).")
@click.option("--videos", type=int, default=48, help="Synthetic videos.")
@click.option("--frames", type=int, default=1000, help="Frames per synthetic video.")
@click.option("--batch-size", type=int, default=128, help="Loader batch size.")
@click.option("--train-batch-size", type=int, default=64, help="Training-step batch size.")
@click.option("--image-size", type=int, default=112)
@click.option("--repeats", type=int, default=3, help="Timed windows per case (the median is reported).")
@click.option("--seconds", type=float, default=8.0, help="Loader window bound in seconds.")
@click.option("--batches", "max_batches", type=int, default=200, help="Loader window bound in batches.")
@click.option("--train-seconds", type=float, default=10.0, help="Training window bound in seconds.")
@click.option("--train-steps", "train_max_steps", type=int, default=20, help="Training window bound in steps.")
@click.option("--warmup", type=int, default=3, help="Loader warm-up batches before timing.")
@click.option("--train-warmup", type=int, default=2, help="Training warm-up steps before timing.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", help="Training device.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=Path("BENCHMARKS.md"),
              help="Markdown file whose bench:start/bench:end section is replaced.")
@click.option("--no-markdown", is_flag=True, help="Do not touch any markdown file.")
@click.option("--peers/--no-peers", default=True,
              help="Also time WebDataset, LitData and FFCV (pip install -e '.[bench]'); rows say when one is missing.")
@click.option("--pretrain/--no-pretrain", default=True,
              help="Also time a pre-training step fed two views a frame (its data-wait share; section 'pretrain').")
@click.option("--seed", type=int, default=0)
def bench(out: Path, markdown: Path, no_markdown: bool, **kw) -> None:
    """Loaders (the research's, the peers', affpipe's) and the training step, frames/s side by side."""
    from affpipe.bench.report import bench_markdown
    from affpipe.bench.run import BenchConfig, run_bench

    cfg = BenchConfig(out=out, markdown=None if no_markdown else markdown, **kw)
    results = run_bench(cfg)
    click.echo(bench_markdown(results, out))
    click.echo(f"wrote {out}/results.json, {out}/loaders.png" + ("" if no_markdown else f", updated {markdown}"))


@main.command("bench-full")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: results.json, tree/ (kept for reruns), index/, shards/.")
@click.option("--full-scale/--small", default=True, help="~2.9M-frame tree, or --videos x --frames.")
@click.option("--videos", type=int, default=24, help="Videos with --small.")
@click.option("--frames", type=int, default=300, help="Frames per video with --small.")
@click.option("--shard-frames", type=int, default=300_000, help="Shard whole train videos up to this many frames.")
@click.option("--naive-frames", type=int, default=500_000,
              help="Time the naive index on whole videos up to this many frames, scaled to the tree.")
@click.option("--workers", type=int, default=0, help="Processes for index and shards (0 = usable cores).")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=Path("BENCHMARKS.md"),
              help="Markdown file whose bench-full:start/bench-full:end section is replaced.")
@click.option("--no-markdown", is_flag=True, help="Do not touch any markdown file.")
@click.option("--seed", type=int, default=0)
def bench_full(out: Path, markdown: Path, no_markdown: bool, **kw) -> None:
    """Synth, index (vs the naive index) and shard writing at full Aff-Wild2 scale."""
    from affpipe.bench.full import BenchFullConfig, full_markdown, run_bench_full

    cfg = BenchFullConfig(out=out, markdown=None if no_markdown else markdown, **kw)
    click.echo(full_markdown(run_bench_full(cfg)))
    click.echo(f"wrote {out}/results.json" + ("" if no_markdown else f", updated {markdown}"))


# ---- report / experiments ------------------------------------------------------------------


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Folder for report.md and the PNGs (optional with exactly two runs: then only the paired difference is printed).")
@click.option("--title", default="affpipe experiments", help="Report title.")
@click.option("--converge-frac", default=0.9, type=click.FloatRange(0.0, 1.0, min_open=True), help="Convergence = first epoch reaching this share of the run's best score.")
@click.option("--resamples", default=2000, type=click.IntRange(min=100), help="Bootstrap resamples of the validation videos.")
def report(runs: tuple[Path, ...], out: Path | None, title: str, converge_frac: float, resamples: int) -> None:
    """Compare RUNS (run folders, or folders of run folders): report.md + PNGs in OUT. With two
    runs, also print their paired differences with 95% intervals over the same resampled videos."""
    from affpipe.experiments.report import ReportConfig, paired_lines, report_folder
    from affpipe.experiments.runs import expand_runs

    found = expand_runs(runs)
    if len(found) == 2:
        click.echo("\n".join(paired_lines(*found, resamples=resamples)))
    elif out is None:
        raise click.UsageError("give -o/--out for a report of other than two runs")
    if out is not None:
        md = report_folder(ReportConfig(runs=runs, out=out, title=title, converge_frac=converge_frac,
                                        resamples=resamples))
        click.echo(f"report: {md}")


def _parse_set(values: tuple[str, ...]) -> tuple[tuple[str, object], ...]:
    """``key=value`` pairs; the value is read as TOML (numbers, true/false, "strings"), else a string."""
    import tomllib

    pairs = []
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected key=value (e.g. device=cuda)", param_hint="--set")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        pairs.append((key.strip(), value))
    return tuple(pairs)


@main.command()
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Folder for data/, runs/, report.md.")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Aff-Wild2 tree (annotations + cropped_aligned) to index and shard.")
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Ready shards to train on.")
@click.option("--scale", type=click.Choice(["synthetic", "full"]), default=None, help="synthetic: the grid's size overrides; full: recipes unchanged. [default: synthetic without --root/--shards, else full]")
@click.option("--grid", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Grid file. [default: the grid shipped with affpipe, affpipe/experiments/recipes/grid.toml]")
@click.option("--only", multiple=True, help="Run only this grid run (repeatable).")
@click.option("--set", "set_", multiple=True, metavar="KEY=VALUE", help="Override for every run, e.g. --set device=cuda --set batch_size=512 (repeatable).")
@click.option("--workers", default=2, type=click.IntRange(min=1), help="Processes for indexing and shard writing.")
@click.option("--seeds", default=1, type=click.IntRange(min=1), help="Train every run with seeds 0..N-1; the report gives the mean, the spread across seeds and comparisons pooled over seeds.")
@click.option("--overwrite", is_flag=True, help="Delete what experiments wrote in OUT (data, runs, report; nothing else) and start afresh: after the grid, a recipe or --set changed.")
def experiments(out: Path, root: Path | None, shards: Path | None, scale: str | None, grid: Path | None,
                only: tuple[str, ...], set_: tuple[str, ...], workers: int, seeds: int, overwrite: bool) -> None:
    """Run the research grid (uni vs multi-task, init, loss variants) and write OUT/report.md."""
    from affpipe.experiments.grid import DEFAULT_GRID, ExperimentsConfig, run_experiments

    cfg = ExperimentsConfig(out=out, grid=grid or DEFAULT_GRID, root=root, shards=shards, scale=scale,
                            only=only, overrides=_parse_set(set_), workers=workers, seeds=seeds,
                            overwrite=overwrite)
    result = run_experiments(cfg)
    for name, status in result["runs"].items():
        click.echo(f"{name:24s} {status}")
    if result["report"]:
        click.echo(f"report: {result['report']}")
    if any(s == "failed" for s in result["runs"].values()) or not result["report"]:
        raise SystemExit(1)
