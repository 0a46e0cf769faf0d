"""evaluate's diagnostic plots, predict's probabilities sidecar and loud thresholds, TensorBoard's
per-class F1, hparams and evaluate's results (issue 25)."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest

from affpipe.labels import AU_NAMES, EXPR_CLASSES
from affpipe.loaders import LoaderConfig
from affpipe.run.folder import DIAGNOSTICS, RUN_OWNER, RunFolder

TORCH = LoaderConfig(backend="torch", num_workers=0)


def test_precision_recall_and_confusion_are_right_on_a_small_case():
    from affpipe.run.diagnostics import confusion_matrix, precision_recall

    p, r, cut = precision_recall(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 0, 1, 0]))
    np.testing.assert_allclose(p, [1.0, 2 / 3, 0.5])
    np.testing.assert_allclose(r, [0.5, 1.0, 1.0])
    np.testing.assert_allclose(cut, [0.9, 0.8, 0.1])
    m = confusion_matrix(np.array([0, 0, 1]), np.array([0, 1, 1]), 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]


def test_evaluate_writes_the_plots_and_tensorboard_gets_its_results(copy_world):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from affpipe.runs import EvalConfig, evaluate

    run = copy_world / "runs" / "frame"
    cfg = json.loads((run / "config.json").read_text())
    cfg["logging"]["tensorboard"] = True  # what a run trained with --tensorboard records
    (run / "config.json").write_text(json.dumps(cfg))
    import torch

    for name in ("best.pt", "last.pt"):  # the checkpoints carry the config evaluate opens with
        state = torch.load(run / name, weights_only=True)
        state["config"]["logging"]["tensorboard"] = True
        torch.save(state, run / name)
    evaluate(EvalConfig(run=run, tune_au_thresholds=True, loader=TORCH, device="cpu"))
    files = RunFolder(run)
    for what in DIAGNOSTICS:
        path = files.diagnostic("eval", what)
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG" and RUN_OWNER.owns(path.name), what
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "eval/p_mtl" in tags and f"eval/au_f1_per_au/{AU_NAMES[0]}" in tags
    assert f"eval/expr_f1_per_class/{EXPR_CLASSES[0]}" in tags


def test_predict_writes_probabilities_beside_unchanged_files_and_says_thresholds(copy_world, tmp_path, caplog):
    from affpipe.run.folder import RunFolder as RF
    from affpipe.runs.predict import PredictConfig, predict

    run = copy_world / "runs" / "frame"
    RF(run).write_thresholds({"au_thresholds": {n: 0.3 for n in AU_NAMES}, "split": "val", "checkpoint": "best.pt"})
    with caplog.at_level(logging.WARNING):
        summary = predict(PredictConfig(run=run, out=tmp_path / "p", format="abaw-single", split="val",
                                        device="cpu", loader=TORCH))
    assert any("thresholds other than 0.5" in r.message and "AU1 0.30" in r.message for r in caplog.records)
    marker = json.loads((tmp_path / "p" / ".affpipe.json").read_text())
    assert marker["inputs"]["au_thresholds"] == [0.3] * 12
    probs = {p.rsplit("/", 1)[1] for p in summary["probabilities"]}
    assert probs == {"VA.csv", "EXPR.csv", "AU.csv"}
    official = {p for p in summary["files"]}
    assert not any("probabilities" in p for p in official)
    with open(tmp_path / "p" / "probabilities" / "EXPR.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["video", "frame", *EXPR_CLASSES] and len(rows) - 1 == summary["predicted_frames"]
    np.testing.assert_allclose(np.array(rows[1:], dtype=object)[:, 2:].astype(float).sum(1), 1.0, atol=1e-4)
    with open(tmp_path / "p" / "probabilities" / "AU.csv") as fh:
        au = list(csv.reader(fh))
    assert au[0][2:] == list(AU_NAMES)


def test_tensorboard_gets_per_class_f1_and_hparams(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from affpipe.run.tracking import TensorBoardSink

    RunFolder(tmp_path).write_config(json.dumps({"task": "mtl", "lr": 0.001, "model": {"arch": "resnet18"}}),
                                     resolved={"device": "cpu"})
    sink = TensorBoardSink(tmp_path)
    sink.record({"kind": "epoch", "epoch": 0, "step": 4, "val": {"p_mtl": 0.5},
                 "val_per": {"expr_f1_per_class": {"Anger": 0.25}, "au_f1_per_au": {"AU1": 0.75}}})
    sink.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"val/p_mtl", "val/expr_f1_per_class/Anger", "val/au_f1_per_au/AU1", "hparams/p_mtl"} <= set(tags)
    assert acc.Scalars("val/au_f1_per_au/AU1")[0].value == pytest.approx(0.75)
    assert list(tmp_path.iterdir()) and not [p for p in tmp_path.iterdir() if p.is_dir()]  # no sub-folder
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["model.arch"].string_value == "resnet18" and start.hparams["resolved.device"].string_value == "cpu"
