"""Shared fixtures: one tiny seeded synthetic tree → index → shards per test session.

Tests that need their own variant build it in ``tmp_path``; these session fixtures serve the
many tests that only read.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from affpipe._optional import dali_available

HAS_DALI = dali_available()


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _gpu_required() -> bool:
    """``AFFPIPE_REQUIRE_GPU=1`` (a GPU host's ``make test-gpu``): a ``gpu`` test that cannot run
    there — no CUDA device, or no DALI for a ``dali`` one — fails instead of skipping."""
    return os.environ.get("AFFPIPE_REQUIRE_GPU", "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_dali = pytest.mark.skip(reason="needs NVIDIA DALI")
    cuda = _has_cuda()
    required = _gpu_required()
    for item in items:
        gpu = "gpu" in item.keywords
        if required and gpu and not (cuda and (HAS_DALI or "dali" not in item.keywords)):
            item.user_properties.append(("gpu_required_but", "no CUDA device" if not cuda else "no NVIDIA DALI"))
            continue
        if gpu and not cuda:
            item.add_marker(skip_gpu)
        if "dali" in item.keywords and not HAS_DALI:
            item.add_marker(skip_dali)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    why = dict(item.user_properties).get("gpu_required_but")
    if why:
        pytest.fail(f"AFFPIPE_REQUIRE_GPU is set but this GPU test cannot run: {why} "
                    f"(torch.cuda.is_available() is {_has_cuda()}, DALI importable: {HAS_DALI})", pytrace=False)


@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory) -> Path:
    """A small abaw6-layout twin with the MTL files: 10 videos x 60 frames, seed 0."""
    from affpipe.synth.generate import SynthConfig, generate

    root = tmp_path_factory.mktemp("synth") / "affwild2"
    generate(SynthConfig(out=root, layout="abaw6", videos=10, frames=60, seed=0, mtl=True))
    return root


@pytest.fixture(scope="session")
def index_dir(synth_tree, tmp_path_factory) -> Path:
    from affpipe.index.build import IndexConfig, build_index

    out = tmp_path_factory.mktemp("index")
    build_index(IndexConfig(root=synth_tree, out=out))
    return out


@pytest.fixture(scope="session")
def shard_dir(index_dir, tmp_path_factory) -> Path:
    from affpipe.shards.write import ShardConfig, write_shards

    out = tmp_path_factory.mktemp("shards") / "tiny"
    write_shards(ShardConfig(index=index_dir, out=out, split="all", samples_per_shard=100, workers=1, seed=0))
    return out
