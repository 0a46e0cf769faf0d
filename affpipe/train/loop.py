"""The training loop: uni-task and multi-task models on shards, single process or torchrun/DDP.

``train(cfg)`` fills a run folder: ``config.json``, ``metrics.jsonl``, ``last.pt`` (every epoch
and every ``ckpt_every`` steps), ``best.pt`` (best validation score), ``curves.png``,
``eval.json`` and ``eval.md``. Only rank 0 writes. ``cfg.resume`` continues a killed run from
``last.pt``, mid-epoch included, without repeating or losing a batch.

Laid out as torchvision's reference scripts: ``train`` (set up, resume, then per epoch
``train_one_epoch`` and ``validate``), with the model/optimizer state and the optimizer step
in :mod:`affpipe.train.trainer`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from tqdm import tqdm

from affpipe import dist
from affpipe.io import atomic_copy, jsonable
from affpipe.run.checkpoint import config_differences, load_checkpoint, save_checkpoint
from affpipe.run.claim import claim_run
from affpipe.run.config import TrainConfig, config_json, to_dict
from affpipe.run.data import check_same_data, lineage_of_run, write_lineage
from affpipe.run.folder import BEST, LAST, RunFolder
from affpipe.run.kind import RunKind
from affpipe.train.evaluate import write_eval
from affpipe.train.trainer import Trainer

log = logging.getLogger(__name__)


def prepare_run_dir(cfg: TrainConfig, kind: RunKind, ctx: dist.DistContext, held: contextlib.ExitStack, *,
                    overwrite: bool = False) -> Path:
    """The run folder, claimed by rank 0 into ``held`` for the run's life
    (:func:`affpipe.run.claim.claim_run`: a user's folder refused, ``--resume`` only of the
    same config and data, ``overwrite`` deletes only the run's files)."""
    if cfg.out is None:
        raise ValueError("train: no run folder given (-o/--out)")
    if ctx.main:
        held.enter_context(claim_run(kind.resolve(cfg), kind, overwrite=overwrite))
    return cfg.out


def resume(trainer: Trainer, run: Path) -> bool:
    """Load ``run/last.pt`` into ``trainer`` (its config must match); without one, a ``best.pt``
    that is the run's latest checkpoint (``claim_run`` checked that: removing ``last.pt`` to
    save space never costs a run); False when there is neither."""
    folder = RunFolder(run)
    last = folder.last if folder.last.exists() else folder.best
    if not last.exists():
        if trainer.ctx.main:
            log.warning("--resume: %s has no %s yet; starting from scratch", run, LAST)
            # What was logged before the first last.pt (e.g. a temporal run's start validation) is redone.
            folder.truncate_metrics(step=-1, epoch=0)
        return False
    ckpt = load_checkpoint(last, map_location=trainer.ctx.device)
    diffs = config_differences(ckpt["config"], to_dict(trainer.cfg))
    if diffs:
        raise ValueError(f"--resume: {last} was trained with another config; differences:\n  " + "\n  ".join(diffs))
    trainer.load_state_dict(ckpt)
    s = trainer.state
    if trainer.ctx.main:
        if last == folder.last:
            repair_best(run, ckpt)
        folder.truncate_metrics(step=s.step, epoch=s.epoch)
        log.info("resuming %s at epoch %d, step %d (%d batches into the epoch)", run, s.epoch + 1, s.step, s.step_in_epoch)
    return True


def repair_best(run: Path, last: dict[str, Any]) -> None:
    """Make ``best.pt`` hold the step ``last.pt`` records as the best (``best_step``; its
    ``best_metrics`` become ``eval.json``). Both are written at the end of an improving epoch,
    ``last.pt`` first; a kill between the two leaves an older (or no) ``best.pt`` beside a
    ``last.pt`` that is the best state itself, so the repair is a copy of ``last.pt``."""
    want = int(last.get("best_step", (last.get("best_metrics") or {}).get("step", -1)))
    if want < 0:
        return
    folder = RunFolder(run)
    best = folder.best
    try:
        have = int(load_checkpoint(best)["step"]) if best.is_file() else None
    except (ValueError, KeyError):  # a foreign or unreadable file: replaced below when we can
        have = None
    if have == want:
        return
    if int(last["step"]) == want and int(last["step_in_epoch"]) == 0:
        log.warning("%s holds step %s, but the best validation score was reached at step %d (killed between "
                    "the two checkpoint writes); restoring it from last.pt", best, have, want)
        atomic_copy(folder.last, best)
        return
    raise ValueError(f"{best} holds step {have}, but {folder.last} (step {last['step']}) records step {want} "
                     "as the best; the pair cannot be repaired: evaluate last.pt or start a new run")


def steps_per_epoch(cfg: TrainConfig, ctx: dist.DistContext, loader) -> int:
    """Optimizer steps per epoch: the same on every rank (DDP hangs otherwise)."""
    steps = len(loader)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    if ctx.distributed:
        n = torch.tensor([steps], device=ctx.device)
        tdist.all_reduce(n, op=tdist.ReduceOp.MIN)
        steps = int(n.item())
    if steps < 1:
        raise ValueError(f"{cfg.data.source}: the train split gives no full batch of {cfg.batch_size} on this rank")
    return steps


def resolved_settings(cfg: TrainConfig, ctx: dist.DistContext, loader) -> dict[str, Any]:
    """What ``auto`` and GPU-only settings became on this machine (config.json's ``resolved``)."""
    return {"device": str(ctx.device), "amp": cfg.amp if ctx.device.type == "cuda" else "none",
            "loader_backend": getattr(loader, "backend", None), "loader_num_workers": getattr(loader, "num_workers", None),
            "world_size": ctx.world}


def val_batches(cfg: TrainConfig, ctx: dist.DistContext, loader, videos_of) -> list[int] | None:
    """The validation batches ``--max-val-steps`` scores: every validation video's, or one error
    (on every rank) naming the smallest value that covers them; None: the whole pass."""
    if not cfg.max_val_steps or videos_of is None:
        return None
    from affpipe.train.evaluate import limited_batches

    error, chosen = None, None
    try:
        chosen = limited_batches(loader, cfg.max_val_steps, videos_of)
    except ValueError as exc:
        error = exc
    if ctx.distributed:
        flag = torch.tensor([int(error is not None)], device=ctx.device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        if flag.item() and error is None:
            raise ValueError(f"--max-val-steps {cfg.max_val_steps} cannot cover another rank's validation videos")
    if error is not None:
        raise error
    if chosen is not None and ctx.main:
        log.info("validation limited to %d of %d batches, chosen to hold every validation video", len(chosen),
                 len(loader))
    return chosen


def train(cfg: TrainConfig, kind: RunKind, *, overwrite: bool = False) -> Path:
    """Train ``cfg`` into the run folder ``cfg.out`` as ``kind`` sets it up (``affpipe.runs.train``
    picks the kind); returns the folder. ``overwrite``: start afresh in a folder holding a run."""
    ctx = dist.setup(cfg.device)
    held = contextlib.ExitStack()  # the run folder's claim (rank 0), released when the run ends
    try:
        run = prepare_run_dir(cfg, kind, ctx, held, overwrite=overwrite)
        if cfg.amp != "none" and ctx.device.type != "cuda" and ctx.main:
            log.debug("amp=%s ignored: autocast is used on GPU only (device %s)", cfg.amp, ctx.device)
        setup = kind.setup(cfg, ctx, run)
        trainer, data = setup.trainer, setup.lineage
        if cfg.resume:
            if ctx.main and (recorded := lineage_of_run(run)) is not None:
                check_same_data(recorded, data, run)
            resume(trainer, run)
        trainer.wrap()
        train_loader, val_loader = setup.loaders()
        if ctx.main:  # trainer.cfg: with what the setup resolved (the backbone's input)
            write_lineage(run, data)
            RunFolder(run).write_config(config_json(trainer.cfg), resolved=resolved_settings(cfg, ctx, train_loader))
        steps = steps_per_epoch(cfg, ctx, train_loader)
        trainer.val_batches = val_batches(cfg, ctx, val_loader, trainer.row_videos)
        if ctx.main:
            log.info("training %s %s: %d steps/epoch x %d epochs, batch %d x %d process(es), loader %s, device %s",
                     cfg.task, setup.what, steps, cfg.epochs, cfg.batch_size, ctx.world,
                     getattr(train_loader, "backend", "?"), ctx.device)
        fit(trainer, run, train_loader, val_loader, steps, lineage=data, start_is_candidate=kind.start_is_candidate)
    finally:
        held.close()
        dist.teardown(ctx)
    return run


def fit(trainer: Trainer, run: Path, train_loader, val_loader, steps: int, lineage: dict | None = None, *,
        start_is_candidate: bool = False) -> None:
    """Epochs from ``trainer.state.epoch`` to ``cfg.epochs``: train, validate, checkpoint, log
    (every checkpoint carries ``lineage``, what the run trains on)."""
    cfg, ctx, state = trainer.cfg, trainer.ctx, trainer.state
    runlog = RunLog(run, ctx, sync=cfg.sync_timing, tensorboard=cfg.logging.tensorboard, start_step=state.step)
    clock = (time.perf_counter(), state.wall_time)
    if ctx.main and state.step == 0:
        runlog.write_init(getattr(trainer.raw_model, "init_report", None))

    def checkpoint(name: str) -> None:
        trainer.state.wall_time = clock[1] + time.perf_counter() - clock[0]
        if ctx.main:
            save_checkpoint(RunFolder(run).checkpoint(name), {**trainer.state_dict(), "lineage": lineage})

    if start_is_candidate and state.step == 0 and state.best_metrics is None:
        # A temporal run starts at its source run's predictions (the skip path): that state is a
        # best.pt candidate too, so training that makes things worse never ships a worse model.
        summary = {"kind": "start", "epoch": 0, "step": 0}
        improved = validate(trainer, val_loader, summary, schedule=False)
        if ctx.main:
            runlog.write(summary)
            if improved:
                keep_predictions(trainer, run)
                checkpoint(BEST)
    while trainer.state.epoch < cfg.epochs:
        state = trainer.state
        epoch = state.epoch
        train_loader.set_epoch(epoch)
        train_one_epoch(trainer, train_loader, steps, runlog, checkpoint)
        summary = {"kind": "epoch", "epoch": epoch, "step": state.step, "lr": trainer.lr, **epoch_means(state.epoch_acc)}
        improved = False
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            improved = validate(trainer, val_loader, summary)
        state.epoch, state.step_in_epoch, state.epoch_acc = epoch + 1, 0, {}
        summary["wall_time"] = clock[1] + time.perf_counter() - clock[0]
        if ctx.main:
            runlog.write(summary)
            if improved:
                keep_predictions(trainer, run)  # before the checkpoints that make this state the best
            checkpoint(LAST)
            if improved:
                checkpoint(BEST)
            plot(run)
    runlog.close()  # (a run that raises leaves its event files flushed up to the last epoch line)
    if ctx.main:
        finish(run, cfg, trainer.state)


def validate(trainer: Trainer, loader, summary: dict[str, Any], *, schedule: bool = True) -> bool:
    """One validation pass: steps the plateau scheduler (unless ``schedule`` is false), updates
    the best score and fills ``summary``; True when the score improved."""
    cfg, ctx, state = trainer.cfg, trainer.ctx, trainer.state
    t0 = time.perf_counter()
    result = trainer.validation(loader)  # the kind's trainer scores the state (supervised pass, or a probe)
    metrics, frames = jsonable(result.metrics), result.frames
    score = metrics.get(cfg.score_key)
    if score is None and ctx.main:
        log.warning("validation gave no %s (%d frames scored: a task without a valid label in them?); this pass "
                    "cannot make best.pt", cfg.score_key, frames)
    score = -math.inf if score is None else float(score)
    if schedule:
        trainer.scheduler.step(score)
    improved = result.candidate and score > state.best_score
    if improved:
        state.best_score = score
        state.best_step = state.step
        state.best_metrics = {**metrics, "frames": frames, "epoch": state.epoch, "step": state.step}
        if ctx.main and trainer.row_videos is not None and result.arrays is not None:  # ~1 s at 1M frames
            from affpipe.scoring.bootstrap import bootstrap_result

            arrays = result.arrays()
            state.best_metrics.update(bootstrap_result(arrays, trainer.row_videos(arrays["row_id"])))
            trainer.best_predictions = arrays
    per = {k: v for k, v in metrics.items() if isinstance(v, dict) and k.endswith(("_per_class", "_per_au"))}
    if per:  # per-class / per-AU F1 (TensorBoard's val/<metric>/<name>)
        summary["val_per"] = per
    summary.update(val={k: v for k, v in metrics.items() if not isinstance(v, dict)}, score_key=cfg.score_key,
                   score=score, best_score=state.best_score, val_frames=frames, val_time_s=time.perf_counter() - t0)
    if ctx.main:
        when = "start (step 0)" if summary.get("kind") == "start" else f"epoch {state.epoch + 1}/{cfg.epochs}"
        log.info("%s: val %s %.4f (best %.4f)", when, cfg.score_key, score, state.best_score)
    return improved


def train_one_epoch(trainer: Trainer, loader, steps: int, runlog: RunLog, checkpoint) -> None:
    """The rest of epoch ``trainer.state.epoch`` (from ``step_in_epoch``), logging every
    ``log_every`` steps and writing ``last.pt`` every ``ckpt_every`` steps."""
    cfg, ctx, state = trainer.cfg, trainer.ctx, trainer.state
    skip = state.step_in_epoch
    if skip:
        # The epoch plan gives batch k without the ones before it: a resumed run starts where
        # the killed one stopped, with the same samples and draws, and decodes nothing twice.
        loader.set_epoch(state.epoch, start_batch=skip)
    it = iter(loader)
    window = Window(runlog.now())
    bar = tqdm(total=steps, initial=skip, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", disable=not ctx.main,
               dynamic_ncols=True, mininterval=1.0)
    for i in range(skip, steps):
        t_wait = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            log.warning("loader ended after %d of %d batches in epoch %d", i, steps, state.epoch + 1)
            break
        wait = time.perf_counter() - t_wait
        if state.step == 0:
            runlog.first_batch(batch)
        window.add(trainer.step(batch), len(batch) * ctx.world, wait)
        state.step += 1
        state.step_in_epoch = i + 1
        bar.update(1)
        if window.n >= cfg.log_every or i + 1 == steps:
            runlog.flush(window, trainer, steps, bar)
        if cfg.ckpt_every and state.step % cfg.ckpt_every == 0 and i + 1 < steps:
            runlog.flush(window, trainer, steps, bar)  # logged steps never outrun the checkpoint
            checkpoint(LAST)
    runlog.flush(window, trainer, steps, bar)  # a loader that ended early: no step goes unchecked
    bar.close()


class Window:
    """Loss sums, frames and data wait of the steps since the last log line."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.reset(t0)

    def reset(self, t0: float) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.finite: list[torch.Tensor] = []  # per step: the loss was finite (checked at the flush)
        self.n, self.frames, self.wait, self.t0 = 0, 0, 0.0, t0

    def add(self, parts: dict[str, torch.Tensor], frames: int, wait: float) -> None:
        self.finite.append(torch.isfinite(parts["loss"]))  # stays on the device: no sync per step
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        self.frames += frames
        self.wait += wait


class RunLog:
    """``metrics.jsonl`` lines (rank 0) and the timing of training windows."""

    def __init__(self, run: Path, ctx: dist.DistContext, *, sync: bool, tensorboard: bool = False,
                 start_step: int = 0) -> None:
        self.folder = RunFolder(run)
        self.path = self.folder.metrics
        self.ctx = ctx
        self.sync = sync and ctx.device.type == "cuda"
        self.tb = None
        if tensorboard and ctx.main:  # fed from write(): the event files hold what metrics.jsonl holds
            from affpipe.run.tracking import TensorBoardSink

            # a resumed run logs again from start_step + 1: what a killed process logged from there on goes
            self.tb = TensorBoardSink(run, purge_step=start_step + 1 if start_step else None)

    def now(self) -> float:
        if self.sync:  # only on request: a sync per step costs GPU overlap
            torch.cuda.synchronize(self.ctx.device)
        return time.perf_counter()

    def write(self, record: dict[str, Any]) -> None:
        record = self.folder.append_metrics(record)  # a full disk names the file
        if self.tb is not None:
            self.tb.record(record)

    def write_init(self, report: dict[str, Any] | None) -> None:
        """Where the backbone's weights came from (a weight file's key summary), once per run."""
        from affpipe.models.weights import summary_counts

        if report is None or (self.path.is_file() and '"kind": "init"' in self.path.read_text()):
            return
        self.write({"kind": "init", "epoch": -1, "step": 0, **summary_counts(report)})

    def first_batch(self, batch) -> None:
        if self.tb is not None and self.ctx.main:
            self.tb.first_batch(batch)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def flush(self, window: Window, trainer: Trainer, steps: int, bar) -> None:
        """Log the window's means (one host sync) and add them to the epoch's running sums."""
        if window.n == 0:
            return
        ctx, state = self.ctx, trainer.state
        now = self.now()
        elapsed = max(now - window.t0, 1e-9)
        names = sorted(window.sums)
        # Per-step finite flags travel with the sums: one all_reduce and one sync per window, and
        # every rank reaches the same verdict (a rank that stopped alone would hang the others).
        vec = torch.cat([torch.stack([window.sums[k].float() for k in names]), torch.stack(window.finite).float()])
        if ctx.distributed:
            tdist.all_reduce(vec)
        host = vec.tolist()
        check_finite(host[len(names):], ctx.world, state, host[names.index("loss")], trainer.cfg.lr, self.path.parent)
        means = {k: v / ctx.world / window.n for k, v in zip(names, host, strict=False)}
        acc = state.epoch_acc
        for k, v in means.items():
            acc[f"sum_{k}"] = acc.get(f"sum_{k}", 0.0) + v * window.n
        for key, value in (("batches", window.n), ("frames", window.frames), ("wait", window.wait), ("time", elapsed)):
            acc[key] = acc.get(key, 0) + value
        fps = window.frames / elapsed
        if ctx.main:
            self.write({"kind": "train", "epoch": state.epoch, "step": state.step, "step_in_epoch": state.step_in_epoch,
                        "steps_in_epoch": steps, "lr": trainer.lr, **means, "frames_per_s": fps,
                        "data_wait_share": window.wait / elapsed})
            bar.set_postfix(loss=f"{means['loss']:.4f}", fps=f"{fps:.0f}", wait=f"{window.wait / elapsed:.0%}")
        window.reset(now)


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; the run stops before the broken state is checkpointed."""


def check_finite(finite: list[float], world: int, state, loss: float, lr: float, run: Path) -> None:
    """Stop at the first step of the window whose loss was not finite on some rank, naming it."""
    bad = [i for i, f in enumerate(finite) if f < world]
    if bad:
        step = state.step - len(finite) + bad[0] + 1
        last = RunFolder(run).last
        kept = (f"stopped and {last} keeps the last checkpoint before it" if last.is_file()
                else "stopped before any checkpoint was written")
        raise TrainingDiverged(
            f"{run}: the loss is not finite ({loss}) at step {step} (epoch {state.epoch + 1}); training "
            f"{kept}. Lower the learning rate (lr {lr}), check the task weights or the data"
        )


def epoch_means(acc: dict[str, float]) -> dict[str, float]:
    """Per-epoch means of the running sums (loss parts, frames/s, data-wait share)."""
    n = max(acc.get("batches", 0), 1)
    out = {f"train_{k.removeprefix('sum_')}": v / n for k, v in acc.items() if k.startswith("sum_")}
    if acc.get("time", 0) > 0:
        out["frames_per_s"] = acc["frames"] / acc["time"]
        out["data_wait_share"] = acc["wait"] / acc["time"]
    return out


def plot(run: Path) -> None:
    """Redraw ``curves.png`` when ``metrics.jsonl`` changed since it was drawn (a plot must never
    kill a long run)."""
    from affpipe.run.plots import plot_curves

    folder = RunFolder(run)
    try:
        if folder.curves.is_file() and folder.curves.stat().st_mtime_ns > folder.metrics.stat().st_mtime_ns:
            return  # drawn from these metrics already (the end of a run after its last epoch)
        plot_curves(folder.metrics, folder.curves, title=run.name)
    except Exception as exc:
        log.warning("curves.png not drawn: %s", exc)


def keep_predictions(trainer: Trainer, run: Path) -> None:
    """The improving validation's predictions as ``eval_predictions.npz`` (for paired comparisons)."""
    kept, trainer.best_predictions = trainer.best_predictions, None
    if kept is not None and trainer.row_videos is not None:
        from affpipe.scoring.bootstrap import save_predictions

        save_predictions(RunFolder(run).predictions(), kept, trainer.row_videos(kept["row_id"]))


def finish(run: Path, cfg: TrainConfig, state) -> None:
    """``eval.json``/``eval.md`` from the validation pass that produced ``best.pt``, with its
    intervals and its kept predictions."""
    if state.best_metrics is None:
        log.warning("no validation score was reached; eval.json not written")
        return
    result = dict(state.best_metrics)
    result.update(task=cfg.task, split="val", checkpoint=BEST)
    if "ci" in result and RunFolder(run).predictions().is_file():
        result["predictions"] = RunFolder(run).predictions().name
    if cfg.max_val_steps:
        result["note"] = (f"validation limited to {cfg.max_val_steps} batches per pass, chosen to hold every "
                          "validation video")
    write_eval(run, result)
    plot(run)
