"""Evaluation: a model's pass over a split, the ABAW metrics' report, ``eval.json`` and ``eval.md``.

The inference helpers the trainer and ``affpipe.runs`` (``evaluate``/``predict`` of every kind of
run) share: autocast, the validation pass, and the one reporting function.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from affpipe.dist import autocast
from affpipe.io import jsonable
from affpipe.labels import AU_NAMES, EXPR_CLASSES
from affpipe.run.config import TrainConfig
from affpipe.run.folder import EVAL_STEM, RunFolder, eval_stem

log = logging.getLogger(__name__)



def covering_batches(batch_videos: list[Any]) -> list[int]:
    """The fewest batches that hold a frame of every video (``batch_videos[b]``: the videos of
    batch ``b``). Validation runs in video order, so each video spans consecutive batches:
    greedy stabbing (the earliest-ending uncovered video's last batch) is optimal."""
    span: dict[Any, list[int]] = {}
    for b, videos in enumerate(batch_videos):
        for v in videos:
            span.setdefault(v, [b, b])[1] = b
    chosen: list[int] = []
    for first, last in sorted(span.values(), key=lambda ab: ab[1]):
        if not chosen or chosen[-1] < first:
            chosen.append(last)
    return chosen


def limited_batches(loader: Any, max_steps: int | None, videos_of: Any, flag: str = "--max-val-steps") -> list[int] | None:
    """Which batches a validation limited to ``max_steps`` batches scores: ones that cover every
    validation video (``covering_batches``), then others spread evenly over the pass; None: the
    whole pass (or, for a loader without ``batch_rows``, its first ``max_steps``: ``iterate_outputs``).
    Fewer steps than cover every video is one error naming the smallest value."""
    n = len(loader)
    if not max_steps or max_steps >= n:
        return None
    if not hasattr(loader, "batch_rows"):  # a loader that cannot say what its batches hold: the first ones
        return None
    batch_videos = [set(np.unique(videos_of(rows)).tolist()) if len(rows) else set() for rows in loader.batch_rows()]
    need = covering_batches(batch_videos)
    if len(need) > max_steps:
        videos = len(set().union(*batch_videos))
        raise ValueError(f"{flag} {max_steps} cannot cover the {videos} validation videos (validation runs in "
                         f"video order, {n} batches); the smallest value that covers them is {len(need)} "
                         "(or leave it out for the whole pass)")
    chosen = set(need)
    for b in np.linspace(0, n - 1, max_steps).round().astype(int).tolist():
        if len(chosen) >= max_steps:
            break
        chosen.add(int(b))
    rest = (b for b in range(n) if b not in chosen)
    while len(chosen) < max_steps:
        chosen.add(next(rest))
    return sorted(chosen)


def _selected(loader: Any, only: list[int]) -> Iterator[Any]:
    """Batches ``only`` (sorted) of ``loader``'s current epoch: each run of consecutive batches
    starts with ``set_epoch(epoch, start_batch=k)``, so the batches between are never built."""
    runs: list[list[int]] = []
    for b in only:
        if runs and runs[-1][-1] + 1 == b:
            runs[-1].append(b)
        else:
            runs.append([b])
    for run in runs:
        loader.set_epoch(loader.epoch, start_batch=run[0])
        it = iter(loader)
        try:
            for _ in run:
                yield next(it)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()


def iterate_outputs(model: nn.Module, loader: Iterable, *, device: torch.device, amp: str = "none",
                    channels_last: bool = False, max_steps: int | None = None,
                    only: list[int] | None = None) -> Iterator[tuple[dict, Any]]:
    """Yield ``(float outputs, batch)`` for each batch of ``loader`` (``only``: those batches,
    see ``limited_batches``; ``max_steps``: the first ones) without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i, batch in enumerate(_selected(loader, only) if only is not None else loader):
                if only is None and max_steps is not None and i >= max_steps:
                    break
                images = batch.images
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast(device, amp):
                    outputs = model(images)
                yield {k: v.float() for k, v in outputs.items()}, batch
    finally:
        model.train(was_training)


def evaluate_model(model: nn.Module, loader: Iterable, heads: tuple[str, ...], *, device: torch.device,
                   amp: str = "none", channels_last: bool = False, max_steps: int | None = None,
                   distributed: bool = False, only: list[int] | None = None) -> tuple[Any, int]:
    """A filled ``MetricAccumulator`` (reduced over ranks when ``distributed``) and the frame count."""
    from affpipe.scoring.metrics import MetricAccumulator

    acc = MetricAccumulator(heads)
    frames = 0
    for outputs, batch in iterate_outputs(model, loader, device=device, amp=amp, channels_last=channels_last,
                                          max_steps=max_steps, only=only):
        acc.update(outputs, batch)
        frames += len(batch)
    if distributed:
        import torch.distributed as dist

        acc.all_reduce()
        count = torch.tensor([frames], dtype=torch.int64, device=device)
        dist.all_reduce(count)
        frames = int(count.item())
    return acc, frames


def report_evaluation(acc: Any, frames: int, cfg: TrainConfig, ckpt: Path, state: dict, split: str, *,
                      tune_au_thresholds: bool = False, write: bool = True,
                      extra: dict[str, Any] | None = None, videos: Any = None,
                      start_is_candidate: bool = False) -> dict[str, Any]:
    """The result of a filled ``MetricAccumulator``: metrics, optionally tuned AU thresholds
    (saved beside ``ckpt``), ``extra`` keys; written as ``eval[_<split>].json``/``.md``. With
    ``videos`` (the video of each of ``acc``'s rows) every metric gets its 95% interval by
    bootstrap over videos and the predictions are kept as ``eval[_<split>]_predictions.npz``.
    The one place an evaluation is reported."""
    folder = RunFolder(ckpt.parent)
    stem = eval_stem(split, smoothed=bool((extra or {}).get("smoothing")))
    result = _result(acc.compute(), cfg, ckpt, state, split, frames)
    result.update(extra or {})
    if start_is_candidate:  # the run's kind keeps its step-0 state as a best.pt candidate
        result["best_is_start"] = int(state.get("step", -1)) == 0
    if videos is not None:
        result["videos"] = int(len(set(np.asarray(videos).tolist())))
    if tune_au_thresholds:
        if "au" not in cfg.heads:
            raise ValueError(f"--tune-au-thresholds: {ckpt} has no AU head (task {cfg.task})")
        thresholds = [float(t) for t in acc.tune_au_thresholds()]
        tuned = acc.compute(au_thresholds=thresholds)
        result["au_thresholds"] = thresholds
        result["tuned"] = jsonable({k: tuned[k] for k in ("au_f1", "au_f1_per_au", "p_mtl") if k in tuned})
        if write:
            folder.write_thresholds({"au_thresholds": dict(zip(AU_NAMES, thresholds, strict=True)), "split": split,
                                     "checkpoint": ckpt.name, "step": int(state.get("step", 0))})
    if videos is not None:
        from affpipe.scoring.bootstrap import evaluation_intervals

        result.update(evaluation_intervals(acc, videos, folder.predictions(stem) if write else None,
                                           au_thresholds=result.get("au_thresholds")))
    if write:
        write_eval(ckpt.parent, result, stem=stem)
        from affpipe.run.diagnostics import write_diagnostics

        write_diagnostics(folder, stem, acc.state(), videos, au_thresholds=result.get("au_thresholds"))
        if cfg.logging.tensorboard:  # the run folder has TensorBoard on: its event files get this evaluation
            from affpipe.run.tracking import record_evaluation

            record_evaluation(folder.path, stem, result)
    return result


def _result(metrics: dict, cfg: TrainConfig, ckpt: Path, state: dict, split: str, frames: int) -> dict:
    result = jsonable(metrics)
    result.update({"task": cfg.task, "split": split, "frames": frames, "checkpoint": ckpt.name,
                   "epoch": int(state.get("epoch", 0)), "step": int(state.get("step", 0))})
    return result


def write_eval(run_dir: Path, result: dict[str, Any], *, stem: str = EVAL_STEM) -> tuple[Path, Path]:
    """``<stem>.json`` (the metrics) and ``<stem>.md`` (tables) in ``run_dir``."""
    return RunFolder(run_dir).write_eval(result, eval_markdown(result), stem)


def _f(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _c(result: dict[str, Any], key: str, item: str | None = None, *, tuned: bool = False) -> str:
    """``result[key]`` (``[item]``), with its 95% interval as ``0.412 [0.371, 0.455]`` when there is
    one; ``n/a`` for a class / AU without a label on the split."""
    from affpipe.scoring.bootstrap import fmt_ci

    if item is not None and item in _unlabelled(result):
        return "n/a"
    src = result.get("tuned", {}) if tuned else result
    value, ci = src.get(key), (result.get("tuned_ci" if tuned else "ci") or {}).get(key)
    if item is not None:
        value, ci = (value or {}).get(item), (ci or {}).get(item)
    return fmt_ci(value, ci) if ci else _f(value)


def _unlabelled(result: dict[str, Any]) -> set[str]:
    return {x for groups in (result.get("unlabelled") or {}).values() for v in groups.values() for x in v}


METRIC_TASKS = {"va_ccc": ("va",), "valence_ccc": ("va",), "arousal_ccc": ("va",), "expr_f1": ("expr",),
                "au_f1": ("au",), "p_mtl": ("va", "expr", "au")}


def _n(result: dict[str, Any], key: str) -> str:
    """How many videos (recordings) of each task the metric rests on, from ``ci_method``."""
    per = (result.get("ci_method") or {}).get("per_task") or {}
    parts = [(t, per[t]) for t in METRIC_TASKS.get(key, ()) if t in per]
    if not parts:
        return ""
    one = [f"{c['videos']}" + (f" ({c['units']} rec.)" if c["units"] != c["videos"] else "") for _, c in parts]
    return one[0] if len(one) == 1 else " / ".join(f"{t.upper()} {x}" for (t, _), x in zip(parts, one, strict=True))


def _cross_validated(cv: dict[str, Any] | None, what: str) -> list[str]:
    """Rows of a ``cross_validated`` entry: every tuned step tuned on the other folds' recordings."""
    if not cv:
        return []
    what = " + ".join(cv.get("tuned") or [what])
    return [f"| {label} ({what} tuned on the other folds: nested, {cv['folds']} folds of recordings) | "
            f"{_c(cv, key)} | {_n(result_like(cv), key)} |"
            for key, label in (("va_ccc", "VA CCC"), ("expr_f1", "EXPR macro F1"), ("au_f1", "AU macro F1"),
                               ("p_mtl", "P_MTL")) if key in cv]


def result_like(cv: dict[str, Any]) -> dict[str, Any]:
    return {"ci_method": cv.get("ci_method")}


def _method_lines(result: dict[str, Any]) -> list[str]:
    """Where the intervals come from, what they rest on, and the warnings, said under the table."""
    ci = result.get("ci_method")
    if not ci:
        return []
    how = ci.get("note") or (f"{ci.get('interval', 'percentile')} bootstrap over {ci.get('recordings', ci['videos'])} "
                             f"{ci['unit']}s (a recording's _left/_right subjects are one unit), "
                             f"{ci['resamples']} resamples")
    lines = ["", f"95% intervals: {how}; the videos column counts the videos with a label for the task."]
    if ci.get("warning"):
        lines.append(f"**Warning:** {ci['warning']}.")
    un = result.get("unlabelled") or {}
    if "expr" in un:
        lines.append(f"EXPR classes without a validation label ({', '.join(un['expr']['no_label'])}): n/a in the "
                     "table, and **in** the macro F1 as 0 (ABAW's macro over all 8 classes).")
    for key, how_ in (("not_annotated", "**out of** the macro F1 (as ABAW1's missing AUs)"),
                      ("no_positive", "**in** the macro F1 (F1 0 when predicted, 0 otherwise)")):
        if key in un.get("au", {}):
            what = "not annotated on any frame" if key == "not_annotated" else "never positive"
            lines.append(f"AUs {what} ({', '.join(un['au'][key])}): n/a in the table, {how_}.")
    return lines


def eval_markdown(result: dict[str, Any]) -> str:
    """Tables as in the research: CCC per dimension, F1 per emotion, F1 per AU."""
    smoothed = " (smoothed)" if result.get("smoothing") else ""
    lines = [f"# Evaluation: task {result.get('task')}, split {result.get('split')}"
             + (", smoothed predictions" if smoothed else ""),
             "",
             f"Checkpoint `{result.get('checkpoint')}` (after {result.get('step')} steps), "
             f"{result.get('frames')} frames with an image."]
    if result.get("best_is_start"):
        lines += ["", "**Best is the start (no step improved):** `best.pt` is step 0, the source run's predictions "
                  "through the skip path; these figures cannot lie below the start by construction (optimistic "
                  "against the per-frame run)."]
    lines += ["", "| Metric | Value | videos |", "|---|---|---|"]
    for key, label in (("va_ccc", "VA CCC (mean of valence, arousal)"), ("expr_f1", "EXPR macro F1"),
                       ("au_f1", "AU macro F1 (threshold 0.5)"), ("p_mtl", "P_MTL = CCC + F1_EXPR + F1_AU")):
        if key in result:
            lines.append(f"| {label}{smoothed} | {_c(result, key)} | {_n(result, key)} |")
    smoothing = result.get("smoothing")
    if smoothing:
        where = f"; tuned on split `{smoothing['tuned_on']}`" if smoothing.get("tuned_on") else ""
        lines.append(f"| Smoothing windows (frames{where}) | "
                     f"{', '.join(f'{t} {w}' for t, w in smoothing['windows'].items())} | |")
        if smoothing.get("tuned_on") == result.get("split"):
            lines.append("| (smoothed figures above: windows tuned on the split they are scored on: optimistic) | | |")
    tuned = result.get("tuned", {})
    if "au_f1" in tuned:
        lines.append(f"| AU macro F1 (thresholds tuned on the split: optimistic) | {_c(result, 'au_f1', tuned=True)} "
                     f"| {_n(result, 'au_f1')} |")
    if "p_mtl" in tuned:
        lines.append(f"| P_MTL (AU thresholds tuned on the split: optimistic) | {_c(result, 'p_mtl', tuned=True)} "
                     f"| {_n(result, 'p_mtl')} |")
    lines += _cross_validated(result.get("cross_validated"), "AU thresholds")
    lines += _cross_validated((smoothing or {}).get("cross_validated"), "smoothing")
    lines += _method_lines(result)
    if "va_ccc" in result:
        lines += ["", "## CCC per dimension", "", "| Dimension | CCC |", "|---|---|",
                  f"| Valence | {_c(result, 'valence_ccc')} |", f"| Arousal | {_c(result, 'arousal_ccc')} |",
                  f"| **Mean** | **{_c(result, 'va_ccc')}** |"]
    if "expr_f1" in result:
        lines += ["", "## F1 per emotion", "", "| Emotion | F1 |", "|---|---|"]
        lines += [f"| {name} | {_c(result, 'expr_f1_per_class', name)} |" for name in EXPR_CLASSES]
        lines.append(f"| **Macro** | **{_c(result, 'expr_f1')}** |")
    if "au_f1" in result:
        tuned_per = tuned.get("au_f1_per_au", {})
        thr = dict(zip(AU_NAMES, result.get("au_thresholds", []), strict=False))
        head = "| AU | F1 (0.5) |" + (" F1 (tuned) | threshold |" if tuned_per else "")
        lines += ["", "## F1 per AU", "", head, "|---|---|" + ("---|---|" if tuned_per else "")]
        for name in AU_NAMES:
            row = f"| {name} | {_c(result, 'au_f1_per_au', name)} |"
            if tuned_per:
                row += f" {_c(result, 'au_f1_per_au', name, tuned=True)} | {thr.get(name, 0.5):.2f} |"
            lines.append(row)
        row = f"| **Macro** | **{_c(result, 'au_f1')}** |"
        if tuned_per:
            row += f" **{_c(result, 'au_f1', tuned=True)}** | |"
        lines.append(row)
        if tuned_per:
            lines += ["", f"Thresholds tuned on split `{result.get('split')}`; tuned figures on the "
                      "tuning split are optimistic."]
    return "\n".join(lines) + "\n"
