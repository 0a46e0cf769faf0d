"""``pytest -m gpu`` on a host without CUDA: skips by default, fails with ``AFFPIPE_REQUIRE_GPU=1``
(a GPU run whose driver is too old for the torch build must not look green)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = "tests/loaders/test_resume.py"  # holds a gpu-marked test that needs no DALI


def _pytest_gpu(require: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "AFFPIPE_REQUIRE_GPU"}
    if require is not None:
        env["AFFPIPE_REQUIRE_GPU"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", GPU_TESTS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_pytest_gpu_fails_without_cuda_when_required():
    plain = _pytest_gpu(None)
    assert plain.returncode == 0 and "skipped" in plain.stdout and "failed" not in plain.stdout, plain.stdout[-2000:]
    required = _pytest_gpu("1")
    assert required.returncode == 1, required.stdout[-2000:]
    assert "1 error" in required.stdout and "AFFPIPE_REQUIRE_GPU is set" in required.stdout
    assert "no CUDA device" in required.stdout
