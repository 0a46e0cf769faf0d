"""``scripts/gpu-check.sh --cpu-smoke``: the rehearsal of the GPU runs passes on a CPU — both
benchmarks' smoke runs exit 0, the `gpu` tests skip without the switch, and with it (and in the
two GPU runs themselves) every GPU step fails instead of passing on nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the rehearsal's no-CUDA branch")
def test_cpu_smoke_rehearsal(tmp_path):
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path)}
    env.pop("AFFPIPE_REQUIRE_GPU", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--cpu-smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.rstrip().endswith("== all steps passed")
    for step in ("gpu_full_smoke: exit 0", "gpu_bench_smoke: exit 0", "gpu_tests_skip: exit 0",
                 "gpu_tests_required: exit 1", "gpu_full_required: exit 1", "gpu_bench_required: exit 1",
                 "run1_without_cuda: exit 1", "run2_without_cuda: exit 1"):
        assert step in out, step
    assert "no parts in" in out  # the no-DALI branch ran
    assert {"gpu-full.json", "gpu.json", "logs.tar.gz"} <= {p.name for p in tmp_path.iterdir()}
    assert len(list(tmp_path.iterdir())) <= 8  # what a GPU run's $OUT may bring back
