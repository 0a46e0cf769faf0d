"""Issue 17 (one verb, one path): ``evaluate`` and ``predict`` are one function each for per-frame,
smoothed and temporal runs; a run is opened once, from any working directory, with its data
moved alongside it or pointed at by ``--shards``/``--features``/``--index``; wrong templates,
non-finite outputs and foreign files in the output folders give one ``Error:`` line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from affpipe.cli import main
from affpipe.labels import AU_NAMES
from affpipe.loaders import LoaderConfig
from affpipe.run.config import TemporalConfig, TrainConfig, load_config

FAST = ["--backend", "torch", "--num-workers", "0", "--device", "cpu"]
TINY = {"task": "mtl", "epochs": 1, "image_size": 32, "batch_size": 16, "max_steps_per_epoch": 2, "max_val_steps": 3,
        "loader.num_workers": 0, "loader.backend": "torch", "device": "cpu", "log_every": 1}


def _lineage(run: Path, index: Path, *, shards: Path | None = None, features: Path | None = None) -> None:
    """``RUN/lineage.json`` as ``train`` records it (paths relative to RUN), for a run made
    before the trainer wrote it itself (kept when it is there)."""
    from affpipe.index.build import index_fingerprint
    from affpipe.lineage import rel_path

    if (run / "lineage.json").is_file():
        return
    rec = {"kind": "temporal" if features else "frames", "table": "frames", "index": rel_path(run, index),
           "index_fingerprint": index_fingerprint(index), "shards": rel_path(run, shards) if shards else None,
           "shards_fingerprint": None, "features": [rel_path(run, features)] if features else None,
           "features_fingerprint": None}
    (run / "lineage.json").write_text(json.dumps(rec))


@pytest.fixture(scope="module")
def world(index_dir, tmp_path_factory) -> Path:
    """world/{index, shards, feats, runs/frame, runs/temporal}: a per-frame MTL run, its features,
    and a temporal head on them, each recording what it was made from."""
    from affpipe.runs.embed import EmbedConfig, embed
    from affpipe.runs.train import train
    from affpipe.runs.train import train as train_temporal
    from affpipe.shards.write import ShardConfig, write_shards

    w = tmp_path_factory.mktemp("one_path") / "world"
    shutil.copytree(index_dir, w / "index")
    write_shards(ShardConfig(index=w / "index", out=w / "shards", split="all", samples_per_shard=100, workers=1))
    frame = train(load_config(None, {**TINY, "shards": w / "shards", "out": w / "runs" / "frame"}))
    _lineage(frame, w / "index", shards=w / "shards")
    embed(EmbedConfig(source=str(frame / "best.pt"), shards=w / "shards", out=w / "feats", batch_size=64,
                      device="cpu", loader=LoaderConfig(backend="torch", num_workers=0)))
    temporal = train_temporal(TrainConfig.of(task="mtl", features=w / "feats", out=w / "runs" / "temporal", epochs=1,
                                          batch_size=4, device="cpu", temporal=TemporalConfig(window=8, stride=4,
                                                                                              hidden=16, layers=1)))
    _lineage(temporal, w / "index", features=w / "feats")
    return w


def cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def _error(code: int, out: str) -> str:
    """The one ``Error:`` line of a refused command (no traceback)."""
    assert code == 1, out
    errors = [ln for ln in out.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in out, out
    return errors[0]


# ---- one function for every kind of run ----------------------------------------------------

@pytest.mark.parametrize("kind", ["frame", "smoothed", "temporal"])
def test_evaluate_and_predict_every_kind_through_one_path(world, tmp_path, kind, monkeypatch):
    import affpipe.run.checkpoint as ckpt_mod

    run = world / "runs" / ("temporal" if kind == "temporal" else "frame")
    loads = []
    real = ckpt_mod.load_checkpoint
    monkeypatch.setattr(ckpt_mod, "load_checkpoint", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    smooth = ["--tune-smoothing"] if kind == "smoothed" else []
    code, out = cli("evaluate", run, *smooth, *FAST)  # no --shards/--features: the run knows its data
    assert code == 0, out
    assert len(loads) == 1  # the checkpoint is loaded once
    stem = "eval_smoothed" if kind == "smoothed" else "eval"  # a smoothed evaluation never replaces eval.json
    ev = json.loads((run / f"{stem}.json").read_text())
    assert ev["skipped"] == {} and ev["frames"] > 0 and ev["videos"] > 0 and "p_mtl" in ev
    assert ("smoothing" in ev) == (kind == "smoothed")
    # Every kind of run: 95% intervals by recording for every metric, predictions kept for `report`.
    assert ev["ci_method"]["unit"] == "recording" and ev["predictions"] == f"{stem}_predictions.npz"
    if ev["videos"] >= 2:
        assert set(ev["ci"]) >= {"va_ccc", "valence_ccc", "arousal_ccc", "expr_f1", "au_f1", "p_mtl",
                                 "expr_f1_per_class", "au_f1_per_au"}
    code, out = cli("predict", run, "-o", tmp_path / "p", "--format", "abaw-single",
                    *(["--smooth"] if kind == "smoothed" else []), *FAST)
    assert code == 0, out
    va = (tmp_path / "p" / "VA.txt").read_text().splitlines()
    assert va[0] == "image_location,valence,arousal" and len(va) > 1
    assert all(np.isfinite([float(x) for x in row.split(",")[1:]]).all() for row in va[1:])


def test_index_flag_is_honoured_on_every_path(world, tmp_path):
    moved = tmp_path / "idx"
    shutil.copytree(world / "index", moved)
    for run in ("frame", "temporal"):
        code, out = cli("evaluate", world / "runs" / run, "--index", moved, *FAST)
        assert code == 0, out
        code, out = cli("predict", world / "runs" / run, "--index", moved, "-o", tmp_path / run, *FAST)
        assert code == 0, out


def test_another_index_is_refused_naming_both_sides(world, tmp_path):
    from affpipe.index.build import IndexConfig, build_index
    from affpipe.synth.generate import SynthConfig, generate

    generate(SynthConfig(out=tmp_path / "tree", layout="abaw6", videos=3, frames=20, seed=5))
    build_index(IndexConfig(root=tmp_path / "tree", out=tmp_path / "other", workers=1))
    for run in ("frame", "temporal"):
        line = _error(*cli("evaluate", world / "runs" / run, "--index", tmp_path / "other", *FAST))
        assert str(tmp_path / "other") in line and "runs" in line
    assert not (tmp_path / "other" / "eval.json").exists()


def test_features_and_shards_flags_fit_the_kind_of_run(world, tmp_path):
    code, out = cli("evaluate", world / "runs" / "temporal", "--features", world / "feats", *FAST)
    assert code == 0, out
    line = _error(*cli("evaluate", world / "runs" / "frame", "--features", world / "feats", *FAST))
    assert "--features" in line and "per-frame" in line
    line = _error(*cli("predict", world / "runs" / "temporal", "--shards", world / "shards", "-o", tmp_path / "x", *FAST))
    assert "--shards" in line and "temporal" in line and not (tmp_path / "x").exists()
    line = _error(*cli("evaluate", world / "runs" / "temporal", "--features", world / "feats", "--features",
                       world / "feats", *FAST))
    assert "2 given" in line


def test_a_run_moved_with_its_data_works_from_any_cwd(world, tmp_path, monkeypatch):
    """Item 6: ``cd / && affpipe evaluate /abs/path/run`` on a run folder moved with its data."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(world, moved)
    hidden = world.with_name("world.hidden")
    world.rename(hidden)  # the paths the runs were trained with are gone
    try:
        monkeypatch.chdir("/")
        for run in ("frame", "temporal"):
            code, out = cli("evaluate", moved / "runs" / run, *FAST)
            assert code == 0, out
            code, out = cli("predict", moved / "runs" / run, "-o", tmp_path / f"pred-{run}", *FAST)
            assert code == 0, out
            assert list((tmp_path / f"pred-{run}" / "VA").glob("*.txt"))
    finally:
        hidden.rename(world)


# ---- templates and editions (item 7) -----------------------------------------------------

def _template(path: Path, header: str | None, rows: list[str]) -> Path:
    path.write_text("".join(f"{r}\n" for r in ([header] if header else []) + rows))
    return path


@pytest.fixture()
def templates(world, tmp_path) -> dict[str, Path]:
    import pyarrow.compute as pc

    from affpipe.index.build import load_index

    table, _ = load_index(world / "index")
    val = table.filter(pc.equal(table["split"], "val"))
    video = sorted(set(val["video"].to_pylist()))[0]
    rows = [f"{video}/{f:05d}.jpg," for f in (1, 2, 3)]
    return {
        "au": _template(tmp_path / "CVPR_6th_ABAW_AU_test_set_example.txt", "image_location," + ",".join(AU_NAMES), rows),
        "va": _template(tmp_path / "CVPR_6th_ABAW_VA_test_set_example.txt", "image_location,valence,arousal", rows),
        "mtl": _template(tmp_path / "MTL_Challenge_test_set_release.txt", "image,valence,arousal,expression,aus",
                         [r.rstrip(",") for r in rows]),
        "va-videos": _template(tmp_path / "Valence_Arousal_Estimation_Challenge_test_set_release.txt", None, [video]),
    }


# (format, template) → None when it fits, else what the one error line says
MATRIX = {
    ("mtl", "au"): "an AU frame list", ("mtl", "va"): "a VA frame list", ("mtl", "va-videos"): "a VA video list",
    ("mtl", "mtl"): None,
    ("abaw-single", "mtl"): "an MTL frame list", ("abaw-single", "au"): None, ("abaw-single", "va"): None,
    ("abaw-single", "va-videos"): None,
    ("abaw-per-video", "mtl"): "an MTL frame list", ("abaw-per-video", "au"): None, ("abaw-per-video", "va-videos"): None,
}


@pytest.mark.parametrize(("fmt", "kind"), list(MATRIX))
def test_every_format_and_template_kind(templates, fmt, kind):
    from affpipe.runs.submission import check_templates

    want = MATRIX[(fmt, kind)]
    if want is None:
        assert len(check_templates((templates[kind],), fmt, ("va", "expr", "au"))) == 1
    else:
        with pytest.raises(ValueError, match=want) as err:
            check_templates((templates[kind],), fmt, ("va", "expr", "au"))
        assert str(templates[kind]) in str(err.value)


def test_cli_mtl_format_with_an_au_template_is_one_line(world, templates, tmp_path):
    out = tmp_path / "o"
    line = _error(*cli("predict", world / "runs" / "frame", "--format", "mtl", "--template", templates["au"],
                       "-o", out, *FAST))
    assert str(templates["au"]) in line and "an AU frame list" in line and "not an MTL" in line
    assert not out.exists()


def test_abaw1_single_files_on_a_12_au_run(world, tmp_path):
    code, out = cli("predict", world / "runs" / "frame", "--format", "abaw-single", "--edition", "abaw1",
                    "-o", tmp_path / "o", *FAST)
    assert code == 0, out
    au = (tmp_path / "o" / "AU.txt").read_text().splitlines()
    ex = (tmp_path / "o" / "EXPR.txt").read_text().splitlines()
    assert au[0] == "image_location,AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25" and len(au[1].split(",")) == 9
    assert all(r.split(",")[7] == "0" for r in au[1:])  # AU20: no model output
    assert ex[0] == "image_location,Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise"
    assert all(0 <= int(r.split(",")[1]) <= 6 for r in ex[1:])


# ---- non-finite outputs ------------------------------------------------------------------

def test_nan_outputs_stop_evaluate_and_predict(world, tmp_path):
    from affpipe.run.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "nanrun"
    run.mkdir()
    state = load_checkpoint(world / "runs" / "frame" / "best.pt")
    key = next(k for k in state["model"] if k.endswith("bias") and "va" in k)
    state["model"][key] = torch.full_like(state["model"][key], float("nan"))
    save_checkpoint(run / "best.pt", {k: v for k, v in state.items() if k != "checkpoint_version"})
    line = _error(*cli("evaluate", run, "--shards", world / "shards", *FAST))
    assert str(run / "best.pt") in line and "not finite" in line and " rows " in line
    assert not (run / "eval.json").exists()
    line = _error(*cli("predict", run, "--shards", world / "shards", "-o", tmp_path / "p", *FAST))
    assert "not finite" in line and not list((tmp_path / "p").glob("*.txt"))


def test_metrics_say_nan_predictions_not_missing_labels(caplog):
    from affpipe.scoring.metrics import MetricAccumulator

    acc = MetricAccumulator(("va",))
    acc.update({"va": torch.tensor([[float("nan"), 0.1], [0.2, 0.3]])},
               {"row_id": torch.tensor([0, 1]), "va": torch.zeros(2, 2), "va_mask": torch.ones(2, dtype=torch.bool)})
    assert int(acc.nonfinite_rows().sum()) == 1
    acc.compute()
    assert "1 of 2 rows have non-finite predictions" in caplog.text and "no valid labels" not in caplog.text


# ---- output folders ----------------------------------------------------------------------

def test_predict_refuses_a_users_file_and_overwrites_only_its_own(world, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "EXPR.txt").write_text("mine\n")
    line = _error(*cli("predict", world / "runs" / "frame", "--format", "abaw-single", "-o", out, *FAST))
    assert "EXPR.txt" in line and (out / "EXPR.txt").read_text() == "mine\n"
    (out / "EXPR.txt").unlink()
    code, text = cli("predict", world / "runs" / "frame", "-o", out, *FAST)  # per-video files
    assert code == 0, text
    assert _error(*cli("predict", world / "runs" / "frame", "--format", "abaw-single", "-o", out, *FAST))
    code, text = cli("predict", world / "runs" / "frame", "--format", "abaw-single", "--overwrite", "-o", out, *FAST)
    assert code == 0, text
    assert (out / "VA.txt").is_file() and not (out / "VA").exists()  # its earlier files went, only those


def test_predict_never_writes_through_a_symlink(world, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "o"
    out.mkdir()
    (out / "VA").symlink_to(tmp_path / "elsewhere")
    line = _error(*cli("predict", world / "runs" / "frame", "-o", out, *FAST))
    assert "VA" in line and not list((tmp_path / "elsewhere").iterdir())


def test_evaluate_writes_only_into_a_run_folder(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "runs" / "frame", run)
    (run / "notes.txt").write_text("mine\n")
    before = (run / "eval.json").read_bytes()
    line = _error(*cli("evaluate", run, "--shards", world / "shards", *FAST))
    assert "notes.txt" in line and (run / "eval.json").read_bytes() == before
    # A bare checkpoint in a folder of its own is evaluated, its files written beside it ...
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(world / "runs" / "frame" / "best.pt", bare / "model.pt")
    code, out = cli("evaluate", bare / "model.pt", "--shards", world / "shards", *FAST)
    assert code == 0, out
    assert (bare / "eval.json").is_file()
    # ... but one lying among a user's files is refused, nothing written beside it.
    (bare / "thesis.txt").write_text("mine\n")
    (bare / "eval.json").unlink()
    line = _error(*cli("evaluate", bare / "model.pt", "--shards", world / "shards", *FAST))
    assert "thesis.txt" in line and not (bare / "eval.json").exists()


def test_a_run_moved_without_its_data_names_the_flag(world, tmp_path):
    run = tmp_path / "alone" / "temporal"
    shutil.copytree(world / "runs" / "temporal", run)
    line = _error(*cli("evaluate", run, *FAST))
    assert "feature table" in line and "--features" in line and "Traceback" not in line
    code, out = cli("evaluate", run, "--features", world / "feats", *FAST)
    assert code == 0, out
    line = _error(*cli("evaluate", run, "--features", tmp_path, *FAST))  # not a feature table
    assert str(tmp_path) in line


def test_evaluate_never_writes_through_a_symlink(tmp_path):
    from affpipe.runs.evaluate import run_folder_for_writing

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"x")
    (tmp_path / "target.json").write_text("mine\n")
    (tmp_path / "run" / "eval.json").symlink_to(tmp_path / "target.json")
    with pytest.raises(FileExistsError, match=r"eval\.json \(symlink\)"), run_folder_for_writing(tmp_path / "run"):
        pass
    assert (tmp_path / "target.json").read_text() == "mine\n"


def test_tune_folds_reports_a_cross_validated_score_beside_the_in_split_one(world):
    run = world / "runs" / "frame"
    code, out = cli("evaluate", run, "--tune-au-thresholds", "--tune-smoothing", "--tune-folds", "2", *FAST)
    assert code == 0, out
    ev = json.loads((run / "eval_smoothed.json").read_text())
    cv = ev["smoothing"]["cross_validated"]  # one nested CV: windows and thresholds tuned on the other folds
    assert cv["folds"] == 2 and len(cv["fold_thresholds"]) == 2 and len(cv["fold_windows"]) == 2
    assert "au_f1" in cv and "p_mtl" in cv and cv["tuned"] == ["smoothing", "AU thresholds"]
    assert "AU thresholds tuned on the split: optimistic" in out
    assert "smoothing + AU thresholds tuned on the other folds: nested, 2 folds of recordings" in out
    # The stored thresholds and windows still come from the whole split.
    assert json.loads((run / "au_thresholds.json").read_text())["split"] == "val"
    assert _error(*cli("evaluate", run, "--tune-folds", "2", *FAST)).endswith(
        "give --tune-au-thresholds or --tune-smoothing with it")
