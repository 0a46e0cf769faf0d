"""``affpipe experiments``: the research questions' run grid as one resumable command.

``affpipe/experiments/recipes/grid.toml`` (package data) lists the runs (a recipe each), their order and
dependencies, and the size of the synthetic twin. ``run_experiments`` prepares the data
(synthetic twin → index → shards, or real Aff-Wild2 via ``root``, or ready ``shards``), trains
every run into ``<out>/runs/<name>/`` and writes ``<out>/report.md`` (``affpipe.experiments.report``).
A run whose ``eval.json`` exists is skipped when it was trained from the same resolved config
(grid, recipe and ``--set`` included: its fingerprint is kept in ``experiments.json``), refused
naming the keys that changed otherwise; one killed midway (``last.pt``, no ``eval.json``)
resumes; a run that fails is one line in the log and the report (its traceback with ``--debug``
and in ``experiments.json``) and only the runs that depend on it are skipped. With ``seeds``
every run is trained once per seed (``<name>-seed<k>``), each seed's cells cached. The folder is
keyed on the grid file's content; ``overwrite`` deletes experiments' own files and starts afresh.

(A little over 400 lines: the grid file's checks and the per-run orchestration share the
``GridRun`` records and the seeded names; the cells' evaluations live in ``temporal.py``.)
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import re
import signal
import time
import tomllib
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affpipe.experiments.cells import (
    cell_inputs,
    changed,
    experiments_owner,
    read_state,
    save_state,
    seeded,
)
from affpipe.lineage import fingerprint
from affpipe.outdir import claim
from affpipe.run.folder import RunFolder

log = logging.getLogger(__name__)

DEFAULT_GRID = Path(__file__).resolve().parent / "recipes" / "grid.toml"
SCALES = ("synthetic", "full")
NEEDS = ("imagenet",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class GridRun:
    """One run of the grid: a recipe plus where its backbone comes from and what it waits for."""

    name: str
    recipe: Path
    overrides: Mapping[str, Any] = field(default_factory=dict)  # the recipe keys that make this cell
    after: tuple[str, ...] = ()
    init_from: str | None = None  # a grid run whose best.pt initializes the backbone
    needs: tuple[str, ...] = ()  # "imagenet": skipped (with a note) when the weights are unavailable
    question: str = ""
    features_from: str | None = None  # a grid run whose best.pt is embedded: this run trains a temporal head on it
    smooth: bool = False  # also evaluate with smoothing tuned on validation (eval_smoothed.json)
    synthetic_overrides: Mapping[str, Any] = field(default_factory=dict)  # on top of the grid's, at synthetic scale


@dataclass(frozen=True)
class Grid:
    """The parsed ``grid.toml``."""

    source: Path
    runs: tuple[GridRun, ...]
    synthetic: Mapping[str, Any] = field(default_factory=dict)  # SynthConfig fields for the twin
    synthetic_overrides: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig overrides


@dataclass(frozen=True)
class ExperimentsConfig:
    """Options of ``affpipe experiments``. Without ``root``/``shards`` the synthetic twin is used."""

    out: Path
    grid: Path = DEFAULT_GRID
    root: Path | None = None  # a real (or any) Aff-Wild2 tree: indexed and sharded under out/data
    shards: Path | None = None  # ready shards: used as they are
    scale: str | None = None  # "synthetic" | "full"; None: synthetic for the twin, full otherwise
    only: tuple[str, ...] = ()  # run just these grid runs (and nothing else)
    overrides: tuple[tuple[str, Any], ...] = ()  # TrainConfig overrides for every run, e.g. device
    workers: int = 2  # processes for indexing and shard writing
    seeds: int = 1  # train every run with seeds 0..seeds-1
    overwrite: bool = False  # delete experiments' own files in out and start afresh

    def __post_init__(self) -> None:
        if self.root is not None and self.shards is not None:
            raise ValueError("give either root (annotations + images) or shards, not both")
        if self.scale is not None and self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}")

    @property
    def resolved_scale(self) -> str:
        if self.scale is not None:
            return self.scale
        return "synthetic" if self.root is None and self.shards is None else "full"


def _where(text: str, source: Path, name: str | None) -> str:
    """``file:line`` of a run's ``name = "..."`` line (just the file when it cannot be found)."""
    if name is not None:
        for lineno, line in enumerate(text.splitlines(), 1):
            if re.match(rf'\s*name\s*=\s*["\']{re.escape(name)}["\']', line):
                return f"{source}:{lineno}"
    return str(source)


@dataclass(frozen=True)
class GridRunEntry:
    """One ``[[run]]`` table of ``grid.toml`` as written (checked by the typed config loader)."""

    name: str
    recipe: str
    overrides: dict[str, Any] = field(default_factory=dict)
    after: tuple[str, ...] = ()
    init_from: str | None = None
    needs: tuple[str, ...] = ()
    question: str = ""
    features_from: str | None = None
    smooth: bool = False
    synthetic_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GridFile:
    """``grid.toml`` as written: ``[synthetic]`` (the twin's SynthConfig fields, ``overrides``)
    and the ``[[run]]`` tables."""

    synthetic: dict[str, Any] = field(default_factory=dict)
    run: tuple[GridRunEntry, ...] = ()


def load_grid(path: Path = DEFAULT_GRID) -> Grid:
    """Parse and check a grid file through the recipes' typed loader (unknown keys and wrong
    types with file:line), then: unique names, recipes exist, dependencies earlier."""
    from affpipe.run.config import build_typed

    path = Path(path)
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    for i, entry in enumerate(data.get("run", []) if isinstance(data.get("run"), list) else []):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{_where(text, path, name)}: run #{i + 1} needs a name of letters, digits, _ . - "
                             f"(got {name!r})")
    spec = build_typed(GridFile, data, str(path), text)
    synthetic = dict(spec.synthetic)
    overrides = synthetic.pop("overrides", {})
    runs: list[GridRun] = []
    seen: set[str] = set()
    for entry in spec.run:
        name = entry.name
        where = _where(text, path, name)
        if name in seen:
            raise ValueError(f"{where}: run name {name!r} appears twice")
        recipe = (path.parent / entry.recipe).resolve()
        if not recipe.is_file():
            raise ValueError(f"{where}: run {name!r}: recipe {recipe} does not exist")
        init_from = entry.init_from
        features_from = entry.features_from
        after = tuple(entry.after)
        for source in (init_from, features_from):
            if source and source not in after:
                after = (*after, source)
        for dep in after:
            if dep not in seen:
                raise ValueError(f"{where}: run {name!r} depends on {dep!r}, which is not a run listed before it")
        needs = tuple(entry.needs)
        if set(needs) - set(NEEDS):
            raise ValueError(f"{where}: run {name!r}: needs must be among {NEEDS}, got {list(needs)}")
        runs.append(GridRun(name=name, recipe=recipe, overrides=_flat(entry.overrides), after=after,
                            init_from=init_from, needs=needs, question=entry.question, features_from=features_from,
                            smooth=entry.smooth, synthetic_overrides=_flat(entry.synthetic_overrides)))
        seen.add(name)
    if not runs:
        raise ValueError(f"{path}: no [[run]] entries")
    return Grid(source=path, runs=tuple(runs), synthetic=synthetic, synthetic_overrides=overrides)


def _flat(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"va_loss": "mse"}}`` → ``{"loss.va_loss": "mse"}`` (TOML dotted keys, either spelling)."""
    out: dict[str, Any] = {}
    for key, value in dict(table).items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_overrides(grid: Grid, run: GridRun, *, scale: str, shards: Path, runs_dir: Path,
                  extra: Mapping[str, Any] = (), seed: int | None = None) -> dict[str, Any]:
    """The ``load_config`` overrides for one run: the cell, data and run folder, scale, seed,
    init, resume. ``seed`` None: the recipe's seed and the plain run name."""
    k = seed or 0
    out = runs_dir / seeded(run.name, k)
    ov: dict[str, Any] = {**run.overrides, "shards": str(shards), "out": str(out)}
    if scale == "synthetic":
        ov.update(grid.synthetic_overrides)
        ov.update(run.synthetic_overrides)
    ov.update(dict(extra))
    if seed is not None:
        ov["seed"] = seed
    if run.features_from:
        from affpipe.experiments.temporal import features_dir

        ov["features"] = str(features_dir(runs_dir, seeded(run.features_from, k)))
        del ov["shards"]  # a temporal run reads its feature table (which records its shards)
    if run.init_from:
        ov["model.init"] = str(RunFolder(runs_dir / seeded(run.init_from, k)).best)
    if RunFolder(out).last.exists():
        ov["resume"] = True  # killed midway: continue from last.pt rather than refuse the folder
    return ov


def imagenet_available() -> tuple[bool, str]:
    """Whether torchvision's ImageNet ResNet-18 weights are in the local cache (never downloaded)."""
    from affpipe.models.model import imagenet_cache_file

    cached = imagenet_cache_file()
    if cached.is_file():
        return True, ""
    return False, f"{cached} is not cached (nothing is downloaded; copy it there to run this cell)"


def die_with_parent(parent: int) -> None:
    """End this process when ``parent`` dies, kill -9 included: the kernel's parent-death signal
    on Linux (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), else a watchdog thread polling the parent pid.
    A parent already gone (before the signal was armed) ends it at once."""
    armed = False
    if hasattr(os, "getppid") and os.uname().sysname == "Linux":
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:
        os._exit(1)
    if not armed:
        import threading

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _train_child(recipe: str, overrides: dict[str, Any], level: int, conn, parent: int | None = None,
                 overwrite: bool = False) -> None:
    """Body of the training process: resolve, train, send back the run folder or the error. It
    dies with the grid's process (``parent``): a killed grid leaves no training behind."""
    if parent is not None:
        die_with_parent(parent)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        from affpipe.run.config import load_config
        from affpipe.runs.train import train

        conn.send(("ok", str(train(load_config(recipe, overrides), overwrite=overwrite))))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise SystemExit(1) from None


def train_run(recipe: Path, overrides: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Resolve the recipe with ``overrides`` and train it in a fresh process (tests replace this);
    ``overwrite``: the cell's folder holds nothing it produced (see ``_one_run``), start afresh.

    A fresh (spawned) process per run: the data preparation before it leaves thread pools
    (pyarrow, OpenCV) behind, and DataLoader workers forked from such a process can deadlock;
    it also gives every run its own memory and keeps one run's crash from ending the grid.
    """
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_train_child, name=f"train-{Path(str(overrides.get('out', recipe))).name}",
                       args=(str(recipe), dict(overrides), logging.getLogger().getEffectiveLevel(), send, os.getpid(),
                             overwrite))
    proc.start()
    send.close()
    try:
        msg = recv.recv()
    except EOFError:  # the child died without a word (killed, out of memory)
        msg = None
    proc.join()
    if msg and msg[0] == "ok":
        return Path(msg[1])
    if msg:
        err = RuntimeError(msg[1])
        err.child_traceback = msg[2]  # type: ignore[attr-defined]  # (for --debug and experiments.json)
        raise err
    raise RuntimeError(f"the training process died (exit code {proc.exitcode})")


def prepare_data(cfg: ExperimentsConfig, grid: Grid) -> tuple[Path, str]:
    """Shards to train on (making them when needed, cached in ``<out>/data``) and a line
    describing the data."""
    from affpipe.shards.format import read_manifest
    from affpipe.twin import prepare_data as prepare

    if cfg.shards is not None:
        read_manifest(cfg.shards, full=False)  # fail before any run starts
        return Path(cfg.shards), f"shards `{cfg.shards}`"
    if cfg.root is not None:
        data = prepare(Path(cfg.out) / "data", root=cfg.root, split="all", workers=cfg.workers)
        return Path(data["shards"]), f"Aff-Wild2 at `{cfg.root}`"
    from affpipe.synth.generate import FULL_SCALE_FRAMES, FULL_SCALE_VIDEOS

    synth = dict(grid.synthetic)
    full = cfg.resolved_scale == "full"
    if full:  # Aff-Wild2's own size; the recipes then run unchanged
        synth.update(videos=FULL_SCALE_VIDEOS, frames=FULL_SCALE_FRAMES)
    log.info("experiments: preparing the synthetic twin, its index and shards in %s", Path(cfg.out) / "data")
    data = prepare(Path(cfg.out) / "data", split="all", workers=cfg.workers, full_scale=full, **synth)
    desc = "the synthetic twin (" + ", ".join(f"{k}={v}" for k, v in synth.items()) + ")"
    return Path(data["shards"]), desc


def _before_run(run: GridRun, runs_dir: Path, shards: Path, seed: int) -> str | None:
    """Embed the ``features_from`` run for a temporal run (once); a reason to skip, or None."""
    if not run.features_from:
        return None
    from affpipe.experiments.temporal import ensure_features

    source = seeded(run.features_from, seed)
    try:
        ensure_features(runs_dir, source, shards)
    except Exception as exc:  # the run is skipped with the reason, the grid goes on
        return f"embedding `{source}` failed: {_failure(f'embedding {source}', exc)}"
    return None


def _after_run(run: GridRun, run_dir: Path, shards: Path, status: dict[str, Any]) -> None:
    """A finished run's evaluation with intervals and kept predictions (once), and, with
    ``smooth = true``, its evaluation with smoothing tuned on validation (once)."""
    if status["status"] not in ("trained", "done"):
        return
    from affpipe.experiments import temporal as cells

    for what, needed, fn in (("evaluation", True, cells.evaluate_cell), ("smoothing", run.smooth, cells.smoothed_eval)):
        if not needed:
            continue
        try:
            fn(run_dir)
        except Exception as exc:  # reported, the grid goes on
            status[what] = f"failed: {_failure(f'{what} of {run_dir.name}', exc)}"


def _skip_reason(run: GridRun, runs_dir: Path, seed: int, status: dict[str, dict[str, Any]],
                 imagenet: list) -> str | None:
    """Why ``run`` (with ``seed``) cannot train now, or None."""
    blocked = [seeded(d, seed) for d in run.after if status.get(seeded(d, seed), {}).get("status") in ("failed", "skipped")]
    if blocked:  # (a refused cell's old eval.json is not the dependency's result)
        return "depends on " + ", ".join(f"`{d}`" for d in blocked) + ", which did not finish"
    missing = [seeded(d, seed) for d in run.after if not RunFolder(runs_dir / seeded(d, seed)).has_eval()]
    if run.init_from and not RunFolder(runs_dir / seeded(run.init_from, seed)).best.exists():
        return f"needs `{seeded(run.init_from, seed)}`'s best.pt, which is not there"
    if missing and any(status.get(d, {}).get("status") in ("failed", "skipped") for d in missing):
        return "depends on " + ", ".join(f"`{d}`" for d in missing) + ", which did not finish"
    if "imagenet" in run.needs:
        if not imagenet:
            imagenet.append(imagenet_available())
        if not imagenet[0][0]:
            return "ImageNet weights unavailable (offline?): " + imagenet[0][1]
    return None


def run_experiments(cfg: ExperimentsConfig) -> dict[str, Any]:
    """Run the grid (every run with each of ``cfg.seeds`` seeds) and write the report.

    Returns ``{"report", "runs": {folder name: status}, "notes"}``. A status is ``trained``,
    ``done`` (already there), ``skipped`` or ``failed``; ``<out>/experiments.json`` keeps the
    statuses, reasons and seconds per run. A finished run is evaluated once more by ``evaluate``
    (intervals, predictions for the report's paired comparisons) unless it already was. ``out``
    holds only what experiments writes (refused otherwise) and was made from the same data.
    """
    grid = load_grid(cfg.grid)
    unknown = set(cfg.only) - {r.name for r in grid.runs}
    if unknown:
        raise ValueError(f"--only: no run(s) {sorted(unknown)} in {grid.source}")
    # The grid by content, not by path: an edited grid.toml is other inputs (the recipes and --set
    # are checked per cell, by their resolved config).
    inputs = {"grid": fingerprint(Path(grid.source).read_text()), "scale": cfg.resolved_scale,
              "root": str(Path(cfg.root).resolve()) if cfg.root else None,
              "shards": str(Path(cfg.shards).resolve()) if cfg.shards else None}
    with claim(cfg.out, experiments_owner(grid, cfg.seeds, Path(cfg.out)), inputs, overwrite=cfg.overwrite):
        return _run_grid(cfg, grid)


def _failure(what: str, exc: BaseException) -> str:
    """One line for a failed step (the log, the report); its traceback at DEBUG (``--debug``)."""
    line = f"{type(exc).__name__}: {exc}" if not hasattr(exc, "child_traceback") else str(exc)
    tb = getattr(exc, "child_traceback", None) or traceback.format_exc()
    log.error("experiments: %s failed: %s", what, line.splitlines()[0] if line else type(exc).__name__)
    log.debug("experiments: %s traceback:\n%s", what, tb)
    return line


def _run_grid(cfg: ExperimentsConfig, grid: Grid) -> dict[str, Any]:
    """``run_experiments`` inside its claimed output folder."""
    from affpipe.experiments.report import ReportConfig, write_report

    out = Path(cfg.out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    scale = cfg.resolved_scale
    shards, data_desc = prepare_data(cfg, grid)
    status: dict[str, dict[str, Any]] = {}
    state = {**read_state(out), "grid": str(grid.source), "scale": scale, "shards": str(shards),
             "seeds": max(cfg.seeds, int(read_state(out).get("seeds", 1) or 1))}
    state.setdefault("cells", {})
    state["runs"] = status
    imagenet: list = []  # the ImageNet check, made once when a run needs it
    for seed in range(cfg.seeds):
        for run in grid.runs:
            if not cfg.only or run.name in cfg.only:
                name = seeded(run.name, seed)
                status[name] = _one_run(cfg, grid, run, seed, runs_dir, shards, status, imagenet, state)
                save_state(out, state)
    notes = [f"Data: {data_desc}; scale `{scale}`"
             + (" (size overrides from the grid's [synthetic.overrides])" if scale == "synthetic" else "")
             + (f"; every run trained with seeds 0..{cfg.seeds - 1}" if cfg.seeds > 1 else "") + "."]
    if cfg.root is None and cfg.shards is None:
        notes.append("The synthetic twin's faces are drawn from their labels, so every task is learnable, but "
                     "they are not real faces: these numbers show the grid works end to end and how the "
                     "comparisons come out on the twin; they say nothing about Aff-Wild2. Rerun with `--root` "
                     "(or `--shards`) on the real data for the research answers.")
    notes += [f"`{n}` {s['status']}: {s['reason']}" for n, s in status.items() if s["status"] in ("skipped", "failed")]
    notes += [f"`{n}` {what}: {s[what]}" for n, s in status.items() for what in ("evaluation", "smoothing") if what in s]
    save_state(out, state)
    finished = tuple(runs_dir / n for n, s in status.items() if s["status"] in ("trained", "done"))
    report = None
    if finished:
        report = write_report(ReportConfig(runs=finished, out=out, title="affpipe experiments: "
                                           f"{len(finished)} of {len(status)} runs", notes=tuple(notes)))
    else:
        log.error("experiments: no run finished; no report written")
    return {"report": report, "runs": {n: s["status"] for n, s in status.items()}, "notes": notes}


def _one_run(cfg: ExperimentsConfig, grid: Grid, run: GridRun, seed: int, runs_dir: Path, shards: Path,
             status: dict[str, dict[str, Any]], imagenet: list, state: dict[str, Any]) -> dict[str, Any]:
    """Train (or reuse, or skip, or refuse: trained from another config) one run with one seed;
    its status entry."""
    name = seeded(run.name, seed)
    run_dir = runs_dir / name
    overrides = run_overrides(grid, run, scale=cfg.resolved_scale, shards=shards, runs_dir=runs_dir,
                              extra=dict(cfg.overrides), seed=seed if cfg.seeds > 1 else None)
    try:
        now = cell_inputs(run.recipe, {k: v for k, v in overrides.items() if k != "resume"}, runs_dir)
    except (ValueError, TypeError) as exc:  # a --set key the recipe does not know: the cell's error
        return {"status": "failed", "reason": _failure(name, exc)}
    why = changed(name, state["cells"].get(name), now) if run_dir.exists() else None
    if why:
        log.error("experiments: %s", why)
        return {"status": "failed", "reason": why}
    if RunFolder(run_dir).has_eval():
        log.info("experiments: %s already trained (eval.json exists)", name)
        done: dict[str, Any] = {"status": "done", "reason": "eval.json exists"}
        _after_run(run, run_dir, shards, done)
        return done
    reason = _skip_reason(run, runs_dir, seed, status, imagenet) or _before_run(run, runs_dir, shards, seed)
    if reason:
        log.warning("experiments: %s skipped: %s", name, reason)
        return {"status": "skipped", "reason": reason}
    log.info("experiments: training %s (%s)", name, run.recipe.name)
    state["cells"][name] = {"fingerprint": fingerprint(now), "inputs": now}
    save_state(runs_dir.parent, state)  # before training: a killed grid still knows what the folder holds
    t0 = time.perf_counter()
    try:
        # A cell killed before its first checkpoint left only its log (no checkpoint, evaluation or
        # predictions): the grid's own, worth nothing; train refuses such a folder without --overwrite.
        files = RunFolder(run_dir)
        restart = run_dir.is_dir() and not files.results() and files.logged_steps() > 0
        train_run(run.recipe, overrides, **({"overwrite": True} if restart else {}))
    except Exception as exc:  # one broken run must not cost the rest of the grid
        line = _failure(name, exc)
        return {"status": "failed", "reason": line, "seconds": time.perf_counter() - t0,
                "traceback": getattr(exc, "child_traceback", None) or traceback.format_exc()}
    ok = RunFolder(run_dir).has_eval()
    result = {"status": "trained" if ok else "failed", "seconds": round(time.perf_counter() - t0, 1),
              **({} if ok else {"reason": "training ended without eval.json"})}
    _after_run(run, run_dir, shards, result)
    return result
