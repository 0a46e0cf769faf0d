"""Training commands: train, evaluate, predict."""

from __future__ import annotations

from pathlib import Path

import click

from affpipe.cli.main import main

# ---- train / evaluate / predict ------------------------------------------------------------


def _loader_options(fn):
    """The loader flags evaluate and predict share (train sets them in its recipe's [loader])."""
    for opt in reversed([
        click.option("--backend", type=click.Choice(["auto", "dali", "torch"]), default="auto", help="Loader backend."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto"),
        click.option("--num-workers", type=click.IntRange(min=0), default=None,
                     help="Loader threads/processes (default: usable cores)."),
        click.option("--on-bad", type=click.Choice(["error", "skip"]), default="error",
                     help="Bad samples: stop, or skip and count them."),
    ]):
        fn = opt(fn)
    return fn


def _csv_floats(value: str | None) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value.split(",") if v.strip())


@main.command()
@click.option("--config", "recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Recipe TOML (pipelines/*.toml); the flags below override it.")
@click.option("--task", type=click.Choice(["va", "expr", "au", "mtl"]), default=None)
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--features", type=click.Path(exists=True, file_okay=False, path_type=Path), multiple=True,
              help="A feature table (`affpipe embed`): train a temporal head on it instead of a model on shards; "
                   "repeated: the tables (of the same index) are joined row for row and concatenated.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Run folder.")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None, help="Per process (per GPU).")
@click.option("--lr", type=float, default=None)
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), default=None)
@click.option("--weight-decay", type=float, default=None)
@click.option("--init", default=None, help="random | imagenet (the backbone's published weights, from the local "
              "cache) | PATH of a checkpoint or weight file (backbone only).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Backbone weights from a .safetensors file or a torch.save'd state dict (never a pickled model).")
@click.option("--backbone", default=None, help="A torchvision classification model name (default resnet18) or "
              "timm/NAME for any timm model.")
@click.option("--temporal-arch", type=click.Choice(["tcn", "transformer"]), default=None, help="With --features.")
@click.option("--window", type=click.IntRange(min=1), default=None, help="With --features: frames per window.")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="With --features: frames between windows.")
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
@click.option("--num-workers", type=int, default=None, help="Loader threads/processes (default: usable cores).")
@click.option("--on-bad", type=click.Choice(["error", "skip"]), default=None,
              help="Bad samples (undecodable JPEG, bad label record, truncated shard): stop, or skip and count.")
@click.option("--ckpt-every", type=int, default=None, help="Also write last.pt every N steps.")
@click.option("--val-every", type=int, default=None, help="Validate every N epochs.")
@click.option("--max-steps-per-epoch", type=int, default=None)
@click.option("--max-val-steps", type=int, default=None)
@click.option("--log-every", type=int, default=None, help="Log to metrics.jsonl every N steps.")
@click.option("--sync-timing/--no-sync-timing", default=None, help="Exact data-wait on GPU (syncs).")
@click.option("--tensorboard/--no-tensorboard", default=None,
              help="TensorBoard event files in the run folder (pip install 'affpipe[tensorboard]').")
@click.option("--seed", type=click.IntRange(min=0), default=None)
@click.option("--label-fraction", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=None,
              help="Train on the labels of this share of the train videos (drawn by --seed; recorded).")
@click.option("--index", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Label index, when it is not where the shard (or feature) manifest says; checked against it.")
@click.option("--resume", is_flag=True, help="Continue the run in -o from its last.pt.")
@click.option("--overwrite", is_flag=True, help="-o holds a run: start afresh (deletes only the run's own files).")
def train(recipe: Path | None, task: str | None, shards: Path | None, features: tuple[Path, ...], out: Path | None,
          resume: bool, overwrite: bool, weights: Path | None,
          compile_: bool | None, task_weights: str | None, **flags) -> None:
    """Train a uni-task (va|expr|au) or multi-task (mtl) model on shards (or, with --features, a
    temporal head on a feature table) into a run folder."""
    from affpipe.dist import dist_env
    from affpipe.run.claim import check_run_folder
    from affpipe.run.config import load_config
    from affpipe.run.folder import RunFolder
    from affpipe.runs.train import train as train_run

    if recipe is None and resume and out is not None and RunFolder(out).has_config():
        check_run_folder(out)  # a config.json of a user's is never read as the run's
        recipe = RunFolder(out).config  # resume with the run's own resolved config
    if recipe is None and task is None:
        raise click.UsageError("give --task or a recipe with --config")
    nested = {"init": "model.init", "backbone": "model.arch", "temporal_arch": "temporal.arch",
              "window": "temporal.window", "stride": "temporal.stride", "dropout": "model.dropout", "va_loss": "loss.va_loss",
              "expr_class_weights": "loss.expr_class_weights", "au_pos_weight": "loss.au_pos_weight",
              "task_weighting": "loss.task_weighting", "backend": "loader.backend",
              "num_workers": "loader.num_workers", "on_bad": "loader.on_bad", "tensorboard": "logging.tensorboard"}
    if weights is not None:
        if features:  # a temporal head has no backbone to load them into: never ignored silently
            raise click.UsageError("--weights initializes a per-frame backbone; a temporal run (--features) has "
                                   "none: embed with `affpipe embed --weights FILE` instead")
        if flags.get("init") not in (None, str(weights)):
            raise click.UsageError("give --weights FILE or --init, not both")
        flags["init"] = str(weights)  # a weight file is the backbone's initialization
    overrides = {nested.get(k, k): v for k, v in flags.items()}
    overrides.update({"task": task, "shards": shards, "features": list(features) or None, "out": out, "compile": compile_,
                      "loss.task_weights": _csv_floats(task_weights), "resume": resume or None})
    cfg = load_config(recipe, overrides)
    if not cfg.data.inputs or cfg.out is None:
        raise click.UsageError("--shards (or --features) and -o/--out are required (or set them in the recipe)")
    run = train_run(cfg, overwrite=overwrite)
    if dist_env()[0] == 0:  # under torchrun only rank 0 reports
        if (text := RunFolder(run).eval_markdown_text()) is not None:
            click.echo(text)
        click.echo(f"run folder: {run}")


def _data_options(fn):
    """The flags evaluate and predict share to point a run at its data (each overrides what the
    run recorded: runs moved without their data, or data moved since)."""
    for opt in reversed([
        click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="A per-frame run's shards (default: those it trained on)."),
        click.option("--features", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="A temporal run's feature table (default: the one it trained on)."),
        click.option("--index", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="The label index (default: the one the run trained on)."),
        click.option("--tuned-from", default=None, metavar="CHECKPOINT",
                     help="Apply the AU thresholds and smoothing windows tuned on this checkpoint of the run (e.g. "
                          "best.pt) to the one evaluated; without it tuned state applies only where it was tuned."),
    ]):
        fn = opt(fn)
    return fn


def _inputs(run: Path, shards: Path | None, features: tuple[Path, ...], index: Path | None,
            tuned_from: str | None = None) -> dict:
    return {"run": run, "shards": shards, "features": tuple(features), "index": index, "tuned_from": tuned_from}


@main.command()
@click.argument("run_or_ckpt", type=click.Path(exists=True, path_type=Path))
@_data_options
@click.option("--split", type=click.Choice(["train", "val"]), default="val")
@click.option("--tune-au-thresholds", is_flag=True, help="Tune per-AU thresholds on this split and store them.")
@click.option("--smooth", is_flag=True, help="Per-video moving average of the predictions (windows of smoothing.json).")
@click.option("--tune-smoothing", is_flag=True, help="Pick the smoothing window per task on this split, store it, apply it.")
@click.option("--tune-folds", type=click.IntRange(min=2), default=None,
              help="Also score the tuning honestly: tune on K-1 folds of the videos, score the held-out fold, rotate "
                   "(the cross-validated figure is reported beside the in-split one; stored values use the whole split).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@_loader_options
def evaluate(run_or_ckpt: Path, shards: Path | None, features: tuple[Path, ...], index: Path | None,
             tuned_from: str | None, split: str,
             tune_au_thresholds: bool, smooth: bool, tune_smoothing: bool, tune_folds: int | None,
             batch_size: int | None, backend: str, device: str, num_workers: int | None, on_bad: str) -> None:
    """Evaluate a run's best.pt (or a checkpoint), per-frame or temporal: eval.json + eval.md beside it."""
    from affpipe.loaders import LoaderConfig
    from affpipe.runs import EvalConfig
    from affpipe.runs import evaluate as run_evaluate
    from affpipe.train.evaluate import eval_markdown

    result = run_evaluate(EvalConfig(
        **_inputs(run_or_ckpt, shards, features, index, tuned_from), split=split, tune_au_thresholds=tune_au_thresholds,
        smooth=smooth, tune_smoothing=tune_smoothing, tune_folds=tune_folds, batch_size=batch_size, device=device,
        loader=LoaderConfig(backend=backend, num_workers=num_workers, on_bad=on_bad)))
    click.echo(eval_markdown(result))


@main.command()
@click.argument("ckpt", type=click.Path(exists=True, path_type=Path))
@_data_options
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["abaw-per-video", "abaw-single", "mtl"]), default="abaw-per-video")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="val")
@click.option("--template", "templates", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="An official test-set file (ABAW5+ sample/example, MTL release, list of video names): "
                   "the output keeps its header, rows and row order; repeatable (one per task).")
@click.option("--fill-missing", is_flag=True,
              help="Template rows of videos not in the split get a default prediction instead of an error.")
@click.option("--edition", type=click.Choice(["abaw1", "abaw2", "abaw3"]), default="abaw3",
              help="Headers without a template: abaw1 (7 classes; AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25), "
                   "abaw2 (7 classes, 12 AUs), abaw3 (ABAW3 on: 8 classes, 12 AUs).")
@click.option("--smooth", is_flag=True, help="Smooth with the windows `evaluate --tune-smoothing` stored.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--overwrite", is_flag=True, help="Replace predict's earlier files in -o (deletes only those).")
@click.option("--video", "videos", multiple=True, type=click.Path(path_type=Path),
              help="Predict on your own VIDEO files or folders instead (repeatable): OUT/crops (cropped once, "
                   "reused), OUT/<track>.csv/.parquet/.png per face.")
@click.option("--overlay", is_flag=True, help="With --video: also OUT/<video>.overlay.avi, the faces annotated.")
@click.option("--au-thresholds", "au_thresholds", default=None, callback=lambda c, p, v: _au_thresholds(v),
              help="AU decision thresholds instead of the run's tuned ones: one value for every AU, or 12 "
                   "comma-separated values in AU order (AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26).")
@_loader_options
def predict(ckpt: Path, shards: Path | None, features: tuple[Path, ...], index: Path | None, tuned_from: str | None,
            out: Path, fmt: str,
            split: str, templates: tuple[Path, ...], fill_missing: bool, edition: str, smooth: bool,
            batch_size: int | None, overwrite: bool, videos: tuple[Path, ...], overlay: bool,
            au_thresholds: tuple[float, ...] | None, backend: str,
            device: str, num_workers: int | None, on_bad: str) -> None:
    """Write CKPT's predictions (a per-frame or temporal run, a run folder or an exported .safetensors)
    in an ABAW submission format under OUT; with --video, per-frame predictions on your own videos."""
    from affpipe.loaders import LoaderConfig
    from affpipe.runs import PredictConfig
    from affpipe.runs import predict as run_predict

    if videos:
        _predict_videos(ckpt, videos, out, smooth=smooth, overlay=overlay, batch_size=batch_size, device=device,
                        overwrite=overwrite, given=bool(shards or index or templates or fill_missing),
                        features=features, au_thresholds=au_thresholds)
        return
    if overlay:
        raise click.UsageError("--overlay goes with --video")

    summary = run_predict(PredictConfig(
        **_inputs(ckpt, shards, features, index, tuned_from), out=out, format=fmt, split=split, templates=tuple(templates),
        fill_missing=fill_missing, edition=edition, smooth=smooth, batch_size=batch_size, device=device,
        overwrite=overwrite, au_thresholds=au_thresholds, loader=LoaderConfig(backend=backend, num_workers=num_workers, on_bad=on_bad)))
    if summary.get("au_thresholds_source") not in (None, "0.5"):
        click.echo(f"AU thresholds: {summary['au_thresholds_source']}")
    click.echo(f"{len(summary['files'])} file(s), {summary['videos']} videos, "
               f"{summary['filled_from_neighbour']} frame(s) filled from a neighbour → {out}")
    if templates:
        click.echo(f"{summary['lines']} template rows; {summary['past_last_frame']} past a video's last indexed "
                   f"frame; {summary['filled_missing']} given the default (--fill-missing); columns without "
                   f"a model output (written 0): {summary['unpredicted_columns'] or 'none'}")


def _au_thresholds(value: str | None) -> tuple[float, ...] | None:
    """``--au-thresholds``: one value for every AU or one per AU, each in [0, 1]."""
    import math

    from affpipe.labels import AU_NAMES

    if value is None:
        return None
    try:
        values = [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: numbers in [0, 1], comma-separated") from None
    if len(values) == 1:
        values = values * len(AU_NAMES)
    if len(values) != len(AU_NAMES):
        raise click.BadParameter(f"{len(values)} values; give one, or {len(AU_NAMES)} ({','.join(AU_NAMES)})")
    bad = [v for v in values if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise click.BadParameter(f"{bad[0]} is not a threshold in [0, 1]")
    return tuple(values)


def _predict_videos(ckpt: Path, videos: tuple[Path, ...], out: Path, *, smooth: bool, overlay: bool,
                    batch_size: int | None, device: str, overwrite: bool, given: bool, features: tuple[Path, ...],
                    au_thresholds: tuple[float, ...] | None) -> None:
    from affpipe.runs.video import VideoPredictConfig, predict_video

    if given:
        raise click.UsageError("--video predicts on the videos' crops: --shards/--index/--template/"
                               "--fill-missing do not apply (--features: a temporal run's tables, when moved)")
    s = predict_video(VideoPredictConfig(run=ckpt, videos=tuple(videos), out=out, smooth=smooth, overlay=overlay,
                                         device=device, batch_size=batch_size or 64, overwrite=overwrite,
                                         features=tuple(features), au_thresholds=au_thresholds))
    click.echo(f"AU thresholds: {s['au_thresholds_from']}" if "au" in s["heads"] else "no AU head")
    if s["smoothing"]:
        click.echo(f"smoothed with the run's windows {s['smoothing']}")
    for t in s["tracks"]:
        click.echo(f"{t['track']}: {t['rows']} frames, {t['rows_with_face']} with a face, "
                   f"{t['rows_empty']} without (empty rows) → {out}/{t['track']}.csv")
    click.echo(f"{s['videos']} video(s), {s['frames']} frames ({s['crops_reused']} video(s) cropped before, reused), "
               f"{s['frames_without_face']} track rows without a face → {out}")


@main.command("export")
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The file to write: FILE.safetensors.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export of that name.")
def export_cmd(run: Path, out: Path, overwrite: bool) -> None:
    """Write RUN's model (weights only, no optimizer) with its config, tuned thresholds and smoothing
    to one .safetensors file that predict and open_run take in place of the run folder."""
    from affpipe.runs.export import ExportConfig, export

    s = export(ExportConfig(run=run, out=out, overwrite=overwrite))
    click.echo(f"{s['file']}: {s['bytes']} bytes (from {s['source']}, {s['source_bytes']} bytes, "
               f"sha256 {s['source_sha256'][:16]}…); AU thresholds: {'tuned' if s['au_thresholds'] else 'none'}, "
               f"smoothing: {'yes' if s['smoothing'] else 'none'}"
               + (f"; the frozen encoder(s) of its features: {', '.join(s['encoders'])}" if s["encoders"] else ""))


@main.command()
@click.option("--config", "recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Pre-training recipe TOML (pipelines/pretrain_*.toml); the flags below override it.")
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--index", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Label index (the probe's labels), when it is not where the shard manifest says.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Run folder.")
@click.option("--method", type=click.Choice(["simsiam", "mae"]), default=None,
              help="Without --config: that method's published recipe.")
@click.option("--splits", default=None, help="Splits to pre-train on, comma-separated: train (default); "
              "train,test = transductive (the test crops, never labels); val only with --force-val.")
@click.option("--force-val", is_flag=True, help="Allow the validation frames in --splits (recorded; scores optimistic).")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None, help="Per process (per GPU).")
@click.option("--image-size", type=int, default=None)
@click.option("--backbone", default=None, help="torchvision name or timm/NAME (MAE: a timm ViT).")
@click.option("--init", default=None, help="random (default) | imagenet (ImageNet, then SSL) | a weight file.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--ckpt-every", type=int, default=None, help="Also write last.pt every N steps.")
@click.option("--max-steps-per-epoch", type=int, default=None)
@click.option("--max-val-steps", type=int, default=None, help="Probe: at most N validation batches.")
@click.option("--probe-every", type=click.IntRange(min=1), default=None, help="k-NN probe every N epochs (and at the end).")
@click.option("--probe-k", type=click.IntRange(min=1), default=None)
@click.option("--probe-frames", type=click.IntRange(min=1), default=None, help="Labelled train frames the probe keeps.")
@click.option("--num-workers", type=int, default=None)
@click.option("--log-every", type=int, default=None)
@click.option("--tensorboard/--no-tensorboard", default=None)
@click.option("--seed", type=click.IntRange(min=0), default=None)
@click.option("--resume", is_flag=True, help="Continue the run in -o from its last.pt.")
@click.option("--overwrite", is_flag=True, help="-o holds a run: start afresh (deletes only the run's own files).")
def pretrain(recipe: Path | None, shards: Path | None, index: Path | None, out: Path | None, method: str | None,
             splits: str | None, force_val: bool, epochs: int | None, batch_size: int | None, image_size: int | None,
             backbone: str | None, init: str | None, device: str | None, ckpt_every: int | None,
             max_steps_per_epoch: int | None, max_val_steps: int | None, probe_every: int | None,
             probe_k: int | None, probe_frames: int | None, num_workers: int | None, log_every: int | None,
             tensorboard: bool | None, seed: int | None, resume: bool, overwrite: bool) -> None:
    """Pre-train a backbone self-supervised (SimSiam, MAE) on every crop of the shards, labelled or
    not, with a k-NN probe on the labelled validation frames; the run folder's best.pt initializes
    `affpipe train --init RUN`."""
    from affpipe.dist import dist_env
    from affpipe.pretrain.recipe import default_recipe, load_recipe, run_config
    from affpipe.run.claim import check_run_folder
    from affpipe.run.config import load_config
    from affpipe.run.folder import RunFolder
    from affpipe.runs.train import train as train_run

    if out is None or (shards is None and not resume):
        raise click.UsageError("--shards and -o/--out are required")
    run_flags = {"device": device, "ckpt_every": ckpt_every, "max_steps_per_epoch": max_steps_per_epoch,
                 "max_val_steps": max_val_steps, "val_every": probe_every, "log_every": log_every, "seed": seed}
    if recipe is None and resume and RunFolder(out).has_config():
        check_run_folder(out)  # resume with the run's own resolved config
        cfg = load_config(RunFolder(out).config, {**run_flags, "epochs": epochs, "resume": True, "shards": shards,
                                                  "index": index})
    else:
        top = {"method": method, "epochs": epochs, "batch_size": batch_size, "image_size": image_size,
               "arch": backbone, "seed": seed}
        if recipe is not None:
            rec = load_recipe(recipe, **top)
        else:
            import dataclasses

            rec = default_recipe(method or "simsiam")
            rec = dataclasses.replace(rec, **{k: v for k, v in top.items() if v is not None and k != "method"},
                                      views=tuple(dataclasses.replace(v, size=image_size or rec.image_size)
                                                  for v in rec.views))
        if splits is not None or force_val:
            import dataclasses

            from affpipe.loaders.pretrain import PretrainData

            chosen = tuple(s.strip() for s in splits.split(",") if s.strip()) if splits else rec.data.splits
            try:
                rec = dataclasses.replace(rec, data=PretrainData(chosen, allow_val=force_val or rec.data.allow_val))
            except ValueError as exc:
                raise click.UsageError(str(exc).replace("set data.allow_val = true (--force-val)",
                                                        "add --force-val")) from None
        extra = {"loader": {"num_workers": num_workers, "backend": "torch"}, "logging": {"tensorboard": tensorboard}}
        extra = {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in extra.items()}
        cfg = run_config(rec, shards=shards, index=index, out=out, resume=resume, probe_k=probe_k,
                         probe_frames=probe_frames, model={"init": init} if init else None,
                         **{k: v for k, v in run_flags.items() if v is not None and k != "seed"}, **extra)
    run = train_run(cfg, overwrite=overwrite)
    if dist_env()[0] == 0:
        if (text := RunFolder(run).eval_markdown_text()) is not None:
            click.echo(text)
        click.echo(f"run folder: {run}")
