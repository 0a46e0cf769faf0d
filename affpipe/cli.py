"""Command line: turns flags into a frozen config dataclass and calls one library function.

Library modules are imported inside each command so ``affpipe --help`` stays fast and a
missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from affpipe import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="affpipe")
@click.option("-v", "--verbose", count=True, help="More logging (-v info is default, -vv debug).")
def main(verbose: int) -> None:
    """affpipe: Aff-Wild2 at full scale — index, shard, stream, train, evaluate, benchmark."""
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# ---- synth ---------------------------------------------------------------------------------


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--layout", type=click.Choice(["abaw2", "abaw3", "abaw5", "abaw6"]), default="abaw6",
              help="ABAW edition whose folder and header conventions to follow.")
@click.option("--videos", type=click.IntRange(min=1), default=None,
              help="Number of videos [default: 24; 560 with --full-scale].")
@click.option("--frames", type=click.IntRange(min=10), default=None,
              help="Mean frames per video [default: 300; 5200 with --full-scale].")
@click.option("--seed", type=int, default=0, help="Same seed, same bytes.")
@click.option("--mtl", is_flag=True, help="Also write the s-Aff-Wild2 MTL files.")
@click.option("--full-scale", is_flag=True,
              help="Aff-Wild2's size (~2.9M frames): a rendered face pool hard-linked into place; resumable.")
def synth(out: Path, layout: str, videos: int | None, frames: int | None, seed: int, mtl: bool,
          full_scale: bool) -> None:
    """Write a synthetic Aff-Wild2 twin (annotations, face JPEGs, ground truth) under OUT."""
    from affpipe.synth import (
        FULL_SCALE_FRAMES,
        FULL_SCALE_VIDEOS,
        SynthConfig,
        format_summary,
        generate,
    )

    cfg = SynthConfig(
        out=out, layout=layout, seed=seed, mtl=mtl, full_scale=full_scale,
        videos=videos if videos is not None else (FULL_SCALE_VIDEOS if full_scale else 24),
        frames=frames if frames is not None else (FULL_SCALE_FRAMES if full_scale else 300),
    )
    try:
        summary = generate(cfg)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
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
def index_cmd(root: Path, out: Path, images: tuple[Path, ...], on_bad_line: str, workers: int) -> None:
    """Find every edition's layout under ROOT and write the label tables to OUT."""
    from affpipe.index import IndexConfig, build_index, format_summary

    try:
        counts = build_index(IndexConfig(root=root, out=out, images=tuple(images),
                                         on_bad_line=on_bad_line, workers=workers))
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(format_summary(counts))
    click.echo(f"wrote {out}/frames.parquet, videos.parquet, index.json"
               + (", mtl_frames.parquet" if "mtl" in counts else ""))


@main.command("stats")
@click.argument("index", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for stats.md and the PNGs.")
def stats_cmd(index: Path, out: Path) -> None:
    """Label statistics of an index: stats.md plus class/AU/valence-arousal plots per split."""
    from affpipe.stats import write_stats

    try:
        md = write_stats(index, out)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {md} and its plots")

# ---- shard / verify / show -----------------------------------------------------------------


@main.command()
@click.argument("index", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Shard folder.")
@click.option("--split", type=click.Choice(["train", "val", "all"]), default="all")
@click.option("--table", type=click.Choice(["frames", "mtl"]), default="frames", help="frames.parquet or mtl_frames.parquet.")
@click.option("--tasks", default="va,expr,au", help="Keep frames with a valid label in at least one of these.")
@click.option("--samples-per-shard", type=int, default=None, help="Default 50000 (~340 MB shards).")
@click.option("--workers", type=int, default=2)
@click.option("--seed", type=int, default=0, help="Seed of the global train shuffle.")
def shard(index: Path, out: Path, split: str, table: str, tasks: str, samples_per_shard: int | None,
          workers: int, seed: int) -> None:
    """Pack INDEX's frames into WebDataset shards (+ DALI .idx); resumes a killed run."""
    from affpipe.shards import ShardConfig, write_shards

    cfg = ShardConfig(index=index, out=out, split=split, table=table,
                      tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
                      samples_per_shard=samples_per_shard, workers=workers, seed=seed)
    manifest = write_shards(cfg)
    for name, info in manifest["splits"].items():
        skipped = ", ".join(f"{k} {v}" for k, v in info["skipped"].items())
        click.echo(f"{name}: {info['samples']} samples in {len(info['shards'])} shards, "
                   f"{info['bytes'] / 1e6:.1f} MB; skipped: {skipped}")
    click.echo(f"manifest: {out / 'manifest.json'}")


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--decode", is_flag=True, help="Also decode every JPEG.")
@click.option("--index", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Label index to check against (default: the one in the manifest).")
def verify(out: Path, decode: bool, index: Path | None) -> None:
    """Re-read every shard in OUT: checksums, counts, .idx offsets, labels against the table."""
    from affpipe.shards import verify_shards

    problems = verify_shards(out, decode=decode, index=index)
    for p in problems:
        click.echo(p, err=True)
    if problems:
        raise SystemExit(1)
    click.echo(f"{out}: all shards OK")


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--png", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output PNG.")
@click.option("--split", type=click.Choice(["train", "val"]), default=None, help="Default: all splits.")
@click.option("--n", type=int, default=36, help="Number of samples.")
@click.option("--seed", type=int, default=0)
def show(out: Path, png: Path, split: str | None, n: int, seed: int) -> None:
    """A grid of random samples from OUT's shards with their labels written on them."""
    from affpipe.shards import write_grid

    click.echo(str(write_grid(out, png, n=n, seed=seed, split=split)))

# ---- train / evaluate / predict ------------------------------------------------------------


def _csv_floats(value: str | None) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value.split(",") if v.strip())


@main.command()
@click.option("--config", "recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Recipe TOML (pipelines/*.toml); the flags below override it.")
@click.option("--task", type=click.Choice(["va", "expr", "au", "mtl"]), default=None)
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Run folder.")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None, help="Per process (per GPU).")
@click.option("--lr", type=float, default=None)
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), default=None)
@click.option("--weight-decay", type=float, default=None)
@click.option("--init", default=None, help="random | imagenet | PATH of a checkpoint (backbone only).")
@click.option("--dropout", type=float, default=None)
@click.option("--va-loss", type=click.Choice(["ccc", "mse"]), default=None)
@click.option("--expr-class-weights/--no-expr-class-weights", default=None)
@click.option("--au-pos-weight/--no-au-pos-weight", default=None)
@click.option("--task-weighting", type=click.Choice(["fixed", "uncertainty"]), default=None)
@click.option("--task-weights", default=None, help="Fixed weights va,expr,au, e.g. 1,1,1.")
@click.option("--backend", type=click.Choice(["auto", "dali", "torch"]), default=None)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--amp", type=click.Choice(["bf16", "fp16", "none"]), default=None, help="GPU only.")
@click.option("--channels-last/--no-channels-last", default=None, help="GPU only.")
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the model.")
@click.option("--image-size", type=int, default=None)
@click.option("--num-workers", type=int, default=None)
@click.option("--ckpt-every", type=int, default=None, help="Also write last.pt every N steps.")
@click.option("--val-every", type=int, default=None, help="Validate every N epochs.")
@click.option("--max-steps-per-epoch", type=int, default=None)
@click.option("--max-val-steps", type=int, default=None)
@click.option("--log-every", type=int, default=None, help="Log to metrics.jsonl every N steps.")
@click.option("--sync-timing/--no-sync-timing", default=None, help="Exact data-wait on GPU (syncs).")
@click.option("--seed", type=int, default=None)
@click.option("--resume", is_flag=True, help="Continue the run in -o from its last.pt.")
def train(recipe: Path | None, task: str | None, shards: Path | None, out: Path | None, resume: bool,
          compile_: bool | None, task_weights: str | None, **flags) -> None:
    """Train a uni-task (va|expr|au) or multi-task (mtl) ResNet-18 on shards into a run folder."""
    import os

    from affpipe.config import load_config
    from affpipe.train import train as run_training

    if recipe is None and resume and out is not None and (out / "config.json").is_file():
        recipe = out / "config.json"  # resume with the run's own resolved config
    if recipe is None and task is None:
        raise click.UsageError("give --task or a recipe with --config")
    nested = {"init": "model.init", "dropout": "model.dropout", "va_loss": "loss.va_loss",
              "expr_class_weights": "loss.expr_class_weights", "au_pos_weight": "loss.au_pos_weight",
              "task_weighting": "loss.task_weighting"}
    overrides = {nested.get(k, k): v for k, v in flags.items()}
    overrides.update({"task": task, "shards": shards, "out": out, "compile": compile_,
                      "loss.task_weights": _csv_floats(task_weights), "resume": resume or None})
    try:
        cfg = load_config(recipe, overrides)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if cfg.shards is None or cfg.out is None:
        raise click.UsageError("--shards and -o/--out are required (or set them in the recipe)")
    run = run_training(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        if (run / "eval.md").is_file():
            click.echo((run / "eval.md").read_text())
        click.echo(f"run folder: {run}")


@main.command()
@click.argument("run_or_ckpt", type=click.Path(exists=True, path_type=Path))
@click.option("--shards", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", type=click.Choice(["train", "val"]), default="val")
@click.option("--tune-au-thresholds", is_flag=True, help="Tune per-AU thresholds on this split and store them.")
@click.option("--batch-size", type=int, default=None)
@click.option("--backend", type=click.Choice(["auto", "dali", "torch"]), default="auto")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
def evaluate(run_or_ckpt: Path, shards: Path, split: str, tune_au_thresholds: bool, batch_size: int | None,
             backend: str, device: str) -> None:
    """Evaluate a run's best.pt (or a checkpoint) on SHARDS: eval.json + eval.md beside it."""
    from affpipe.evaluate import eval_markdown
    from affpipe.evaluate import evaluate as run_evaluate

    result = run_evaluate(run_or_ckpt, shards, split=split, tune_au_thresholds=tune_au_thresholds,
                          batch_size=batch_size, backend=backend, device=device)
    click.echo(eval_markdown(result))


@main.command()
@click.argument("ckpt", type=click.Path(exists=True, path_type=Path))
@click.option("--shards", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["abaw-per-video", "abaw-single", "mtl"]), default="abaw-per-video")
@click.option("--split", type=click.Choice(["train", "val"]), default="val")
@click.option("--batch-size", type=int, default=None)
@click.option("--backend", type=click.Choice(["auto", "dali", "torch"]), default="auto")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
def predict(ckpt: Path, shards: Path, out: Path, fmt: str, split: str, batch_size: int | None, backend: str,
            device: str) -> None:
    """Write CKPT's predictions on SHARDS in an ABAW submission format under OUT."""
    from affpipe.predict import predict as run_predict

    summary = run_predict(ckpt, shards, out, fmt, split=split, batch_size=batch_size, backend=backend, device=device)
    click.echo(f"{len(summary['files'])} file(s), {summary['videos']} videos, "
               f"{summary['filled_from_neighbour']} frame(s) filled from a neighbour → {out}")

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
@click.option("--seed", type=int, default=0)
def bench(out: Path, markdown: Path, no_markdown: bool, **kw) -> None:
    """Loaders (research's vs affpipe's) and the training step, frames/s side by side."""
    from affpipe.bench import BenchConfig, run_bench
    from affpipe.bench_report import bench_markdown

    try:
        cfg = BenchConfig(out=out, markdown=None if no_markdown else markdown, **kw)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
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
    from affpipe.bench_full import BenchFullConfig, full_markdown, run_bench_full

    try:
        cfg = BenchFullConfig(out=out, markdown=None if no_markdown else markdown, **kw)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(full_markdown(run_bench_full(cfg)))
    click.echo(f"wrote {out}/results.json" + ("" if no_markdown else f", updated {markdown}"))


# ---- report / experiments ------------------------------------------------------------------


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Folder for report.md and the PNGs.")
@click.option("--title", default="affpipe experiments", help="Report title.")
@click.option("--converge-frac", default=0.9, type=click.FloatRange(0.0, 1.0, min_open=True), help="Convergence = first epoch reaching this share of the run's best score.")
def report(runs: tuple[Path, ...], out: Path, title: str, converge_frac: float) -> None:
    """Compare RUNS (run folders, or folders of run folders): report.md + PNGs in OUT."""
    from affpipe.report import ReportConfig, write_report

    try:
        md = write_report(ReportConfig(runs=runs, out=out, title=title, converge_frac=converge_frac))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
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
@click.option("--grid", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Grid file. [default: pipelines/experiments/grid.toml]")
@click.option("--only", multiple=True, help="Run only this grid run (repeatable).")
@click.option("--set", "set_", multiple=True, metavar="KEY=VALUE", help="Override for every run, e.g. --set device=cuda --set batch_size=512 (repeatable).")
@click.option("--workers", default=2, type=click.IntRange(min=1), help="Processes for indexing and shard writing.")
def experiments(out: Path, root: Path | None, shards: Path | None, scale: str | None, grid: Path | None,
                only: tuple[str, ...], set_: tuple[str, ...], workers: int) -> None:
    """Run the research grid (uni vs multi-task, init, loss variants) and write OUT/report.md."""
    from affpipe.experiments import DEFAULT_GRID, ExperimentsConfig, run_experiments

    try:
        cfg = ExperimentsConfig(out=out, grid=grid or DEFAULT_GRID, root=root, shards=shards, scale=scale,
                                only=only, overrides=_parse_set(set_), workers=workers)
        result = run_experiments(cfg)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    for name, status in result["runs"].items():
        click.echo(f"{name:24s} {status}")
    if result["report"]:
        click.echo(f"report: {result['report']}")
    if any(s == "failed" for s in result["runs"].values()) or not result["report"]:
        raise SystemExit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
