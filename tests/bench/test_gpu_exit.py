"""The GPU benchmarks cannot pass by testing nothing: a failed case or stage exits non-zero, and
``AFFPIPE_REQUIRE_GPU=1`` turns "no CUDA device" (and cases skipped for want of a GPU or DALI)
into failures."""

from __future__ import annotations

import json

import pytest
import torch

from affpipe.bench.common import NEEDS_DALI, NEEDS_GPU, REQUIRE_GPU_ENV, failed_rows

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def test_failed_rows(monkeypatch):
    rows = [{"name": "a", "status": "ok"}, {"name": "b", "status": NEEDS_GPU}, {"name": "c", "status": NEEDS_DALI},
            {"name": "d", "status": "error: RuntimeError: boom"}]
    monkeypatch.delenv(REQUIRE_GPU_ENV, raising=False)
    assert failed_rows(rows) == ["d: error: RuntimeError: boom"]
    monkeypatch.setenv(REQUIRE_GPU_ENV, "1")
    assert [r.split(":")[0] for r in failed_rows(rows)] == ["b", "c", "d"]
    monkeypatch.setenv(REQUIRE_GPU_ENV, "0")
    assert len(failed_rows(rows)) == 1


def test_bench_gpu_smoke_exits_1_when_a_case_fails(tmp_path, monkeypatch):
    from affpipe.bench import gpu as bench_gpu
    from affpipe.bench.cases import TrainStep

    monkeypatch.delenv(REQUIRE_GPU_ENV, raising=False)

    def broken(self, batch_size, image_size):
        raise RuntimeError("made to fail")

    monkeypatch.setattr(TrainStep, "synthetic_step", broken)
    out = tmp_path / "g"
    assert bench_gpu.main(["--out", str(out), "--cpu-smoke", "--data", "fallback"]) == 1
    rows = bench_gpu.case_rows(json.loads((out / "results.json").read_text()))
    errors = [r["name"] for r in rows if r["status"].startswith("error")]
    assert errors == ["synthetic-64px"], rows


def test_bench_gpu_smoke_exits_0_without_error_rows(tmp_path, monkeypatch):
    from affpipe.bench import gpu as bench_gpu

    monkeypatch.delenv(REQUIRE_GPU_ENV, raising=False)
    out = tmp_path / "g"
    assert bench_gpu.main(["--out", str(out), "--cpu-smoke", "--data", "fallback"]) == 0
    rows = bench_gpu.case_rows(json.loads((out / "results.json").read_text()))
    assert rows and not [r for r in rows if r["status"].startswith("error")]
    assert {r["name"]: r["status"] for r in rows}["synthetic-64px"] == "ok"


@pytest.mark.parametrize("smoke", [True, False])
def test_bench_gpu_required_without_cuda_fails(tmp_path, monkeypatch, smoke):
    from affpipe.bench import gpu as bench_gpu

    monkeypatch.setenv(REQUIRE_GPU_ENV, "1")
    with pytest.raises(SystemExit, match=REQUIRE_GPU_ENV):
        bench_gpu.main(["--out", str(tmp_path / "g"), *(["--cpu-smoke"] if smoke else [])])
    assert not (tmp_path / "g" / "results.json").exists()


def test_gpu_full_exits_1_when_a_stage_fails(tmp_path, monkeypatch):
    from affpipe.bench import gpu_full

    monkeypatch.delenv(REQUIRE_GPU_ENV, raising=False)

    def broken(*args, **kwargs):
        raise RuntimeError("made to fail")

    monkeypatch.setattr(gpu_full, "stage_epoch", broken)
    assert gpu_full.main(["--out", str(tmp_path / "g"), "--cpu-smoke"]) == 1


def test_gpu_full_required_without_cuda_fails(tmp_path, monkeypatch):
    from affpipe.bench import gpu_full

    monkeypatch.setenv(REQUIRE_GPU_ENV, "1")
    with pytest.raises(SystemExit, match=REQUIRE_GPU_ENV):
        gpu_full.main(["--out", str(tmp_path / "g"), "--cpu-smoke"])
