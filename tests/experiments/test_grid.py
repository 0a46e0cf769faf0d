"""affpipe.experiments.grid: the grid file, every recipe, and the orchestration with training mocked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import fake_run

from affpipe.experiments import grid as ex
from affpipe.run.config import load_config

GRID = ex.DEFAULT_GRID


def test_grid_parses_and_covers_the_questions():
    grid = ex.load_grid(GRID)
    runs = {r.name: r for r in grid.runs}
    cfgs = {n: load_config(r.recipe, {**r.overrides, **({"features": "feats"} if r.features_from else {})})
            for n, r in runs.items()}
    # The per-frame cells are one base recipe plus one or two keys each.
    frame = [r for r in grid.runs if not r.features_from]
    assert len({r.recipe for r in frame}) == 1 and all(len(r.overrides) <= 2 for r in frame)
    kinds = {(c.task, c.model.init, c.loss.va_loss, c.loss.expr_class_weights, c.loss.au_pos_weight,
              c.loss.task_weighting) for c in cfgs.values()}
    for task in ("va", "expr", "au"):
        assert any(c.task == task for c in cfgs.values())
    assert ("mtl", "random", "ccc", True, True, "fixed") in kinds
    assert ("mtl", "imagenet", "ccc", True, True, "fixed") in kinds and runs["mtl_imagenet"].needs == ("imagenet",)
    assert ("va", "random", "mse", True, True, "fixed") in kinds
    assert any(c.task == "expr" and not c.loss.expr_class_weights for c in cfgs.values())
    assert any(c.task == "au" and not c.loss.au_pos_weight for c in cfgs.values())
    assert ("mtl", "random", "ccc", True, True, "uncertainty") in kinds
    from_uni = [r for r in grid.runs if r.init_from]
    assert {r.init_from for r in from_uni} == {"uni_va", "uni_expr", "uni_au"}
    assert all(r.init_from in r.after for r in from_uni)
    # Multi-task runs come after the uni-task runs.
    order = [r.name for r in grid.runs]
    assert max(order.index(n) for n in ("uni_va", "uni_expr", "uni_au")) < min(
        order.index(n) for n in order if cfgs[n].task == "mtl")
    # Only one thing changes between compared cells: optimizer, lr, batch, epochs are shared.
    assert len({(c.optimizer, c.lr, c.batch_size, c.epochs, c.image_size) for c in cfgs.values()
                if not (c.kind == "temporal")}) == 1
    # Temporal context: TCN and Transformer heads on the features of the per-frame multi-task run.
    temporal = {cfgs[r.name].data.temporal.arch: r for r in grid.runs if r.features_from}
    assert set(temporal) == {"tcn", "transformer"}
    assert all(r.features_from == "mtl_random" and "mtl_random" in r.after and r.smooth for r in temporal.values())
    assert runs["mtl_random"].smooth


def test_every_recipe_loads_with_the_run_overrides(tmp_path):
    grid = ex.load_grid(GRID)
    assert grid.synthetic["videos"] >= 1 and grid.synthetic_overrides["epochs"] >= 1
    for run in grid.runs:
        for scale in ("synthetic", "full"):
            ov = ex.run_overrides(grid, run, scale=scale, shards=tmp_path / "s", runs_dir=tmp_path / "runs")
            cfg = load_config(run.recipe, ov)
            assert cfg.out == tmp_path / "runs" / run.name
            assert cfg.data.inputs[0].parent == (tmp_path / "data" / "features" if run.features_from else tmp_path)
            # (a temporal run reads its table, which records its shards)
            if scale == "synthetic":
                want = {**grid.synthetic_overrides, **run.synthetic_overrides}
                from affpipe.run.config import flat_config

                flat = flat_config(cfg)  # dotted keys: temporal.window, loss.va_loss...
                assert all(flat[k] == v for k, v in want.items()), {k: (flat.get(k), v) for k, v in want.items()}
            else:  # full scale: the recipe as written (but for the backbone of init_from runs)
                plain = {**run.overrides, "shards": ov.get("shards"), "out": str(cfg.out), "model.init": ov.get("model.init"),
                         "features": ov.get("features")}
                assert cfg == load_config(run.recipe, plain)
            if run.features_from:
                assert cfg.data.features[0] == tmp_path / "data" / "features" / run.features_from
            if run.init_from:
                assert cfg.model.init == str(tmp_path / "runs" / run.init_from / "best.pt")


@pytest.mark.parametrize("body, message", [
    ('[[run]]\nname = "a"\nrecipe = "r.toml"\nfoo = 1\n', "grid.toml:4: unknown key 'run.foo'; known keys in [run]"),
    ('[[run]]\nname = "a"\nrecipe = "r.toml"\nsmooth = 3\n', "grid.toml:4: run.smooth must be true or false, got 3"),
    ('[[run]]\nname = "a"\nrecipe = "r.toml"\nafter = "b"\n', "grid.toml:4: run.after must be a list"),
    ('[[run]]\nname = "a"\nrecipe = "r.toml"\nafter = ["b"]\n', "grid.toml:2: run 'a' depends on 'b'"),
    ('[[run]]\nname = "a"\nrecipe = "missing.toml"\n', "recipe"),
    ('[[run]]\nname = "a"\nrecipe = "r.toml"\n[[run]]\nname = "a"\nrecipe = "r.toml"\n', "appears twice"),
    ('[[run]]\nname = "a"\nrecipe = "r.toml"\nneeds = ["gpu"]\n', "needs must be among"),
    ('[other]\n', "grid.toml:1: unknown key 'other'; known keys: run, synthetic"),
])
def test_grid_errors_name_the_file_and_line(tmp_path, body, message):
    (tmp_path / "r.toml").write_text('task = "va"\n')
    (tmp_path / "grid.toml").write_text(body)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        ex.load_grid(tmp_path / "grid.toml")


class FakeTrainer:
    """Stands in for train(): resolves the config for real, writes a contract-shaped run folder."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail

    def __call__(self, recipe: Path, overrides: dict, **kw) -> Path:
        cfg = load_config(recipe, overrides)
        self.calls.append((cfg.out.name, dict(overrides)))
        self.kwargs = getattr(self, "kwargs", {})
        self.kwargs[cfg.out.name] = kw
        if cfg.out.name in self.fail:
            raise RuntimeError("boom")
        fake_run(cfg.out.parent, cfg.out.name, cfg.task, init=cfg.model.init, va_loss=cfg.loss.va_loss,
                 weighting=cfg.loss.task_weighting, epochs=cfg.epochs, seed=len(self.calls), exist_ok=True,
                 predictions=True)
        config = json.loads((cfg.out / "config.json").read_text())
        (cfg.out / "config.json").write_text(json.dumps({**config, "seed": cfg.seed}))
        (cfg.out / "best.pt").write_bytes(b"fake")
        if (cfg.kind == "temporal"):  # what the report tells temporal runs by
            config = json.loads((cfg.out / "config.json").read_text())
            config.update(shards=None, features=str(cfg.data.features[0]), temporal={"arch": cfg.data.temporal.arch})
            (cfg.out / "config.json").write_text(json.dumps(config))
        return cfg.out


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setattr(ex, "imagenet_available", lambda: (False, "resnet18-f37072fd.pth is not cached"))
    # The grid's temporal cells on fake checkpoints: embedding recorded, smoothing a copy of eval.json.
    import affpipe.experiments.temporal as et

    monkeypatch.setattr(et, "ensure_features", lambda runs, source, shards: et.features_dir(runs, source))

    def smoothed(run_dir):
        ev = json.loads((Path(run_dir) / "eval.json").read_text())
        ev["smoothing"] = {"windows": {"va": 9}}
        (Path(run_dir) / "eval_smoothed.json").write_text(json.dumps(ev))
        return ev

    monkeypatch.setattr(et, "smoothed_eval", smoothed)


def test_experiments_orchestration(tmp_path, monkeypatch, offline):
    trainer = FakeTrainer()
    monkeypatch.setattr(ex, "train_run", trainer)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"schema_version": 1, "splits": {}}')  # training is mocked
    cfg = ex.ExperimentsConfig(out=tmp_path / "exp", shards=shards, scale="synthetic",
                               overrides=(("device", "cpu"),))
    result = ex.run_experiments(cfg)
    grid = ex.load_grid(GRID)
    expected = [r.name for r in grid.runs if r.name != "mtl_imagenet"]
    assert [name for name, _ in trainer.calls] == expected
    assert result["runs"]["mtl_imagenet"] == "skipped"
    assert all(result["runs"][n] == "trained" for n in expected)
    calls = dict(trainer.calls)
    assert calls["mtl_from_uni_au"]["model.init"] == str(tmp_path / "exp" / "runs" / "uni_au" / "best.pt")
    assert calls["uni_va"]["epochs"] == grid.synthetic_overrides["epochs"] and calls["uni_va"]["device"] == "cpu"
    assert calls["uni_va"]["shards"] == str(shards)
    md = (tmp_path / "exp" / "report.md").read_text()
    assert md.split("## ")[1].startswith("Multi-task vs uni-task")
    temporal = md.split("## Temporal context")[1].split("\n## ")[0]
    for row in ("`mtl_random` per-frame |", "`mtl_random` per-frame + smoothing", "`mtl_tcn` tcn |",
                "`mtl_transformer` transformer + smoothing"):
        assert row in temporal
    assert calls["mtl_tcn"]["features"] == str(tmp_path / "exp" / "data" / "features" / "mtl_random")
    assert "`mtl_imagenet` skipped: ImageNet weights unavailable" in md and "resnet18-f37072fd.pth" in md
    # Every trained run's eval.json value appears in the report.
    for name in expected:
        run = tmp_path / "exp" / "runs" / name
        task = json.loads((run / "config.json").read_text())["task"]
        key = {"va": "va_ccc", "expr": "expr_f1", "au": "au_f1", "mtl": "p_mtl"}[task]
        assert f"{json.loads((run / 'eval.json').read_text())[key]:.4f}" in md
    status = json.loads((tmp_path / "exp" / "experiments.json").read_text())
    assert status["runs"]["uni_va"]["status"] == "trained"
    # Resumable: a second call trains nothing.
    trainer.calls.clear()
    again = ex.run_experiments(cfg)
    assert trainer.calls == [] and again["runs"]["uni_va"] == "done"


def test_experiments_seeds(tmp_path, monkeypatch, offline):
    trainer = FakeTrainer()
    monkeypatch.setattr(ex, "train_run", trainer)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text('{"schema_version": 1, "splits": {}}')
    only = ("uni_va", "uni_expr", "uni_au", "mtl_random", "mtl_from_uni_va")
    cfg = ex.ExperimentsConfig(out=tmp_path / "e", shards=tmp_path / "s", only=only, seeds=2)
    result = ex.run_experiments(cfg)
    names = [n for n, _ in trainer.calls]
    assert names == [*only, *(f"{n}-seed1" for n in only)]
    calls = dict(trainer.calls)
    assert calls["uni_va"]["seed"] == 0 and calls["uni_va-seed1"]["seed"] == 1
    # A seed's cells start from the same seed's cells.
    assert calls["mtl_from_uni_va-seed1"]["model.init"] == str(tmp_path / "e" / "runs" / "uni_va-seed1" / "best.pt")
    assert all(s == "trained" for s in result["runs"].values())
    md = (tmp_path / "e" / "report.md").read_text()
    seeds = md.split("## Seeds")[1].split("\n## ")[0]
    assert "| `mtl_random` | 2 |" in seeds and " ± " in seeds
    assert "2 seeds per cell" in md.split("## Multi-task vs uni-task")[1].split("\n## ")[0]
    # More seeds later: the cached cells of seeds 0 and 1 are reused, only seed 2 trains.
    trainer.calls.clear()
    again = ex.run_experiments(ex.ExperimentsConfig(out=tmp_path / "e", shards=tmp_path / "s", only=only, seeds=3))
    assert [n for n, _ in trainer.calls] == [f"{n}-seed2" for n in only]
    assert again["runs"]["uni_va-seed1"] == "done"


def test_failed_run_skips_only_its_dependents(tmp_path, monkeypatch, offline):
    trainer = FakeTrainer(fail=("uni_expr",))
    monkeypatch.setattr(ex, "train_run", trainer)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text('{"schema_version": 1, "splits": {}}')
    monkeypatch.setattr(ex, "train_run", FakeTrainer())
    ex.run_experiments(ex.ExperimentsConfig(out=tmp_path / "exp", shards=tmp_path / "s", only=("uni_va",)))
    import shutil

    shutil.rmtree(tmp_path / "exp" / "runs" / "uni_va")  # the grid's folder, with nothing trained yet
    monkeypatch.setattr(ex, "train_run", trainer)
    killed = tmp_path / "exp" / "runs" / "uni_au"
    killed.mkdir(parents=True)
    (killed / "last.pt").write_bytes(b"half")  # a killed run resumes
    result = ex.run_experiments(ex.ExperimentsConfig(out=tmp_path / "exp", shards=tmp_path / "s"))
    assert result["runs"]["uni_expr"] == "failed"
    assert result["runs"]["mtl_from_uni_expr"] == "skipped" and result["runs"]["mtl_from_uni_va"] == "trained"
    calls = dict(trainer.calls)
    assert calls["uni_au"]["resume"] is True and "resume" not in calls["uni_va"]
    assert "epochs" not in calls["uni_va"]  # --shards without --scale: full scale, recipes unchanged
    md = (tmp_path / "exp" / "report.md").read_text()
    assert "`uni_expr` failed: RuntimeError: boom" in md


def test_cli_experiments_only(tmp_path, monkeypatch, offline):
    from affpipe.cli import main

    monkeypatch.setattr(ex, "train_run", FakeTrainer())
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text('{"schema_version": 1, "splits": {}}')
    args = ["experiments", "--shards", str(tmp_path / "s"), "-o", str(tmp_path / "e"), "--only", "uni_va",
            "--only", "mtl_random", "--set", "batch_size=16", "--set", "device=cpu"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "uni_va" in res.output and "report:" in res.output
    assert sorted(p.name for p in (tmp_path / "e" / "runs").iterdir()) == ["mtl_random", "uni_va"]
    assert json.loads((tmp_path / "e" / "runs" / "uni_va" / "config.json").read_text())["task"] == "va"
    res = CliRunner().invoke(main, ["experiments", "--shards", str(tmp_path / "s"), "-o", str(tmp_path / "e"),
                                    "--only", "nope"])
    assert res.exit_code != 0 and "no run(s) ['nope']" in res.output


@pytest.mark.slow
def test_one_real_tiny_run(tmp_path):
    """No mocks: a tiny twin → index → shards → one real uni-task run → the report."""
    recipe = (GRID.parent / "exp_frame.toml").as_posix()
    grid = tmp_path / "grid.toml"
    grid.write_text(f"""[synthetic]\nvideos = 4\nframes = 24\nseed = 1\n
[synthetic.overrides]\nepochs = 2\nbatch_size = 8\nimage_size = 32\nmax_steps_per_epoch = 2
max_val_steps = 3\ndevice = "cpu"\n"loader.backend" = "torch"\nlog_every = 1\n
[[run]]\nname = "uni_va"\nrecipe = "{recipe}"\noverrides = {{ task = "va" }}\n""")
    result = ex.run_experiments(ex.ExperimentsConfig(out=tmp_path / "e", grid=grid, workers=1))
    assert result["runs"] == {"uni_va": "trained"}
    assert (tmp_path / "e" / "data" / "shards" / "manifest.json").exists()
    run = tmp_path / "e" / "runs" / "uni_va"
    ev = json.loads((run / "eval.json").read_text())
    md = (tmp_path / "e" / "report.md").read_text()
    from affpipe.scoring.bootstrap import fmt_ci

    # Evaluated once more after training: the interval over the twin's validation videos, kept predictions.
    assert fmt_ci(ev["va_ccc"], ev["ci"].get("va_ccc")) in md and "synthetic twin" in md
    assert ev["ci_method"]["unit"] == "recording" and (run / "eval_predictions.npz").is_file()
    from affpipe.experiments.report import load_run

    assert [p["epoch"] for p in load_run(run).curve] == [0, 1]


def test_wheel_ships_the_grid_and_its_recipes(tmp_path):
    """`pip wheel .` packs the default grid and every recipe it names (package data), so
    `affpipe experiments` without --grid works from a normal install."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(root)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("affpipe-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "affpipe/experiments/recipes/grid.toml" in names
    grid = ex.load_grid(GRID)
    for run in grid.runs:
        rel = Path(run.recipe).resolve().relative_to(GRID.parent.resolve())
        assert f"affpipe/experiments/recipes/{rel.as_posix()}" in names, rel
    assert GRID.is_relative_to(Path(ex.__file__).resolve().parent)


def test_experiments_and_report_refuse_folders_they_did_not_write(tmp_path, monkeypatch, offline):
    from affpipe.cli import main

    monkeypatch.setattr(ex, "train_run", FakeTrainer())
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text('{"schema_version": 1, "splits": {}}')
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("x")
    args = ["experiments", "--shards", str(tmp_path / "s"), "-o", str(mine), "--only", "uni_va"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "not written by `affpipe experiments`" in res.output and "chapter1.tex" in res.output
    assert sorted(p.name for p in mine.iterdir()) == ["chapter1.tex"]
    out = tmp_path / "e"
    assert CliRunner().invoke(main, [*args[:4], str(out), *args[5:]]).exit_code == 0
    for rel in ("runs/notes.txt", "data/mine.csv", "runs/uni_va/thesis.txt", "todo.txt"):  # owned by name only
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("mine")
        res = CliRunner().invoke(main, [*args[:4], str(out), *args[5:]])
        assert res.exit_code == 1 and rel in res.output, (rel, res.output)
        if rel != "todo.txt":
            (out / rel).unlink()
    # The report refuses a folder of someone else's, and the experiments folder itself.
    run = out / "runs" / "uni_va"
    for target in (mine, out):
        res = CliRunner().invoke(main, ["report", str(run), "-o", str(target)])
        assert res.exit_code == 1 and res.output.startswith("Error:"), res.output
    assert CliRunner().invoke(main, ["report", str(run), "-o", str(tmp_path / "r")]).exit_code == 0
    assert CliRunner().invoke(main, ["report", str(run), "-o", str(tmp_path / "r")]).exit_code == 0  # rerun: ours
    # Other data into the same folder: refused, naming both sides.
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / "manifest.json").write_text('{"schema_version": 1, "splits": {}}')
    (out / "todo.txt").unlink()
    res = CliRunner().invoke(main, ["experiments", "--shards", str(tmp_path / "s2"), "-o", str(out), "--only", "uni_va"])
    assert res.exit_code == 1 and "from other inputs" in res.output and "s2" in res.output


def _small_grid(tmp_path: Path, task: str = "va") -> Path:
    recipe = (GRID.parent / "exp_frame.toml").as_posix()
    grid = tmp_path / "grid.toml"
    grid.write_text(f'[[run]]\nname = "uni_va"\nrecipe = "{recipe}"\noverrides = {{ task = "{task}" }}\n')
    return grid


def _shards(tmp_path: Path) -> Path:
    (tmp_path / "s").mkdir(exist_ok=True)
    (tmp_path / "s" / "manifest.json").write_text('{"schema_version": 1, "splits": {}}')
    return tmp_path / "s"


def test_a_cell_trained_from_another_config_is_refused_not_reported_as_the_new_one(tmp_path, monkeypatch, offline):
    """Issue 24: --set (or a recipe) that changes a cell's resolved config; an edited grid file at
    the same path; --overwrite deletes experiments' own files and retrains."""
    trainer = FakeTrainer()
    monkeypatch.setattr(ex, "train_run", trainer)
    grid, shards, out = _small_grid(tmp_path), _shards(tmp_path), tmp_path / "e"
    cfg = ex.ExperimentsConfig(out=out, grid=grid, shards=shards)
    assert ex.run_experiments(cfg)["runs"] == {"uni_va": "trained"}
    state = json.loads((out / "experiments.json").read_text())
    assert state["cells"]["uni_va"]["inputs"]["task"] == "va" and state["cells"]["uni_va"]["fingerprint"]
    trainer.calls.clear()
    changed = ex.ExperimentsConfig(out=out, grid=grid, shards=shards,
                                   overrides=(("lr", 0.5), ("loss.va_loss", "mse")))
    result = ex.run_experiments(changed)
    assert trainer.calls == [] and result["runs"] == {"uni_va": "failed"}
    note = next(n for n in result["notes"] if n.startswith("`uni_va` failed"))
    assert "lr: 0.001 (in the folder) vs 0.5 (now)" in note and "loss.va_loss: 'ccc'" in note and "--overwrite" in note
    assert ex.run_experiments(cfg)["runs"] == {"uni_va": "done"}  # the config it was trained from: still done
    _small_grid(tmp_path, task="expr")  # the same path, another content
    with pytest.raises(FileExistsError, match="from other inputs .grid:"):
        ex.run_experiments(cfg)
    result = ex.run_experiments(ex.ExperimentsConfig(out=out, grid=grid, shards=shards, overwrite=True))
    assert result["runs"] == {"uni_va": "trained"} and [n for n, _ in trainer.calls] == ["uni_va"]
    assert json.loads((out / "runs" / "uni_va" / "config.json").read_text())["task"] == "expr"


def test_a_cell_killed_before_its_first_checkpoint_is_restarted_by_the_grid(tmp_path, monkeypatch, offline):
    trainer = FakeTrainer()
    monkeypatch.setattr(ex, "train_run", trainer)
    cfg = ex.ExperimentsConfig(out=tmp_path / "e", grid=_small_grid(tmp_path), shards=_shards(tmp_path))
    ex.run_experiments(cfg)
    cell = tmp_path / "e" / "runs" / "uni_va"
    for p in cell.iterdir():
        if p.name not in ("config.json", "metrics.jsonl"):
            p.unlink()  # as a kill mid-epoch 1 leaves it: the log of steps, nothing produced
    assert ex.run_experiments(cfg)["runs"] == {"uni_va": "trained"}
    assert trainer.kwargs["uni_va"] == {"overwrite": True}


def test_a_failed_cell_is_one_line_without_a_traceback(tmp_path, monkeypatch, offline, caplog):
    import logging

    from affpipe.cli import main

    monkeypatch.setattr(ex, "train_run", FakeTrainer(fail=("uni_va",)))
    args = ["experiments", "--shards", str(_shards(tmp_path)), "-o", str(tmp_path / "e"), "--grid",
            str(_small_grid(tmp_path))]
    with caplog.at_level(logging.INFO):
        res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "Traceback" not in res.output
    failed = [r for r in caplog.records if "uni_va failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is None and failed[0].getMessage().endswith("RuntimeError: boom")
    assert all(r.exc_info is None and "Traceback" not in r.getMessage() for r in caplog.records
               if r.levelno >= logging.INFO)
    state = json.loads((tmp_path / "e" / "experiments.json").read_text())
    assert "Traceback" in state["runs"]["uni_va"]["traceback"]  # kept for whoever debugs it
    assert "--overwrite" in CliRunner().invoke(main, ["experiments", "--help"]).output


_PARENT = """
import os, sys, time
import multiprocessing as mp
from tests_child import child
if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=child, args=(os.getpid(), sys.argv[1]))
    p.start()
    time.sleep(600)
"""

_CHILD = """
import os, time
from affpipe.experiments.grid import die_with_parent

def child(parent, pidfile):
    die_with_parent(parent)
    with open(pidfile, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(600)
"""


def test_the_training_child_dies_with_a_killed_grid(tmp_path):
    """kill -9 of the grid's process ends its training process (the kernel's parent-death signal)."""
    import inspect
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "tests_child.py").write_text(_CHILD)
    (tmp_path / "parent.py").write_text(_PARENT)
    pidfile = tmp_path / "child.pid"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(pidfile)], env=env, cwd=tmp_path)
    child = None
    try:
        deadline = time.monotonic() + 120
        while not (pidfile.is_file() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        child = int(pidfile.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
            state = Path(f"/proc/{child}/stat").read_text().split()[2] if Path(f"/proc/{child}/stat").exists() else "X"
            if state == "Z":  # reaped by init soon; dead already
                break
            time.sleep(0.2)
        alive = Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z"
        assert not alive, "the training child outlived its killed parent"
        assert "die_with_parent(parent)" in inspect.getsource(ex._train_child)
        assert "os.getpid()" in inspect.getsource(ex.train_run)
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and Path(f"/proc/{child}").exists():
            os.kill(child, signal.SIGKILL)
