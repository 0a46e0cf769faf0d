"""Item 4 of issue 12: a kill between two checkpoint writes never ships the wrong best.pt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from affpipe.run.checkpoint import load_checkpoint
from affpipe.run.config import load_config

TINY = {"task": "mtl", "epochs": 2, "image_size": 32, "batch_size": 16, "max_steps_per_epoch": 1,
        "max_val_steps": 3, "loader": {"num_workers": 0, "backend": "torch"}, "device": "cpu", "log_every": 1,
        "model": {"arch": "timm/test_resnet"}}  # 0.4M parameters: the checkpoint pair is the point, not the model


class _Killed(BaseException):
    """Stands for kill -9: not an Exception, so nothing in train() handles it."""


def _run(shards: Path, out: Path, *, kill_after: int | None = None, resume: bool = False,
         monkeypatch=None, epochs: int = 2) -> list[str]:
    """Train; with ``kill_after`` the run dies right after that many checkpoint writes.
    Returns the names of the checkpoint files written, in order."""
    import affpipe.train.loop as loop

    real = loop.save_checkpoint
    written: list[str] = []

    def save(path, state):
        real(path, state)
        written.append(Path(path).name)
        if kill_after is not None and len(written) == kill_after:
            raise _Killed

    monkeypatch.setattr(loop, "save_checkpoint", save)
    cfg = load_config(None, {**TINY, "shards": shards, "out": out, "epochs": epochs,
                                    "resume": resume or None})
    try:
        __import__("affpipe.runs.train", fromlist=["train"]).train(cfg)
    except _Killed:
        pass
    return written


def _state(run: Path) -> tuple[dict, float, int]:
    best = load_checkpoint(run / "best.pt")
    return best["model"], json.loads((run / "eval.json").read_text())["p_mtl"], best["step"]


def _kill_and_resume(shard_dir: Path, tmp_path: Path, monkeypatch, points, epochs: int = 2) -> None:
    ref = tmp_path / "ref"
    sequence = _run(shard_dir, ref, monkeypatch=monkeypatch, epochs=epochs)
    assert sequence[:2] == ["last.pt", "best.pt"]  # epoch 1 always improves on -inf
    ref_model, ref_score, ref_step = _state(ref)
    assert ref_score == pytest.approx(load_checkpoint(ref / "best.pt")["best_score"])
    for k in points(sequence):
        run = tmp_path / f"killed-after-{k}"
        _run(shard_dir, run, kill_after=k, monkeypatch=monkeypatch, epochs=epochs)
        assert not (run / "eval.json").exists()
        _run(shard_dir, run, resume=True, monkeypatch=monkeypatch, epochs=epochs)
        model, score, step = _state(run)
        assert (step, score) == (ref_step, pytest.approx(ref_score)), f"killed after write {k}"
        assert all(torch.equal(model[n], ref_model[n]) for n in ref_model), f"killed after write {k}"
        assert score == pytest.approx(load_checkpoint(run / "best.pt")["best_score"])


def test_kill_between_last_and_best_then_resume(shard_dir, tmp_path, monkeypatch):
    """The reported case: killed after last.pt, before best.pt (one epoch: the resumed run has
    nothing left to train and used to finish with no or an older best.pt beside eval.json)."""
    _kill_and_resume(shard_dir, tmp_path, monkeypatch, lambda seq: [1], epochs=1)


@pytest.mark.slow
def test_kill_after_every_checkpoint_write_then_resume(shard_dir, tmp_path, monkeypatch):
    """A kill right after each write of the run (and so before eval.json), each resumed."""
    _kill_and_resume(shard_dir, tmp_path, monkeypatch, lambda seq: range(1, len(seq) + 1))
