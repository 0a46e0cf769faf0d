"""Shared fixtures: one tiny seeded synthetic tree → index → shards per test session.

Tests that need their own variant build it in ``tmp_path``; these session fixtures serve the
many tests that only read.
"""

from __future__ import annotations

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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_dali = pytest.mark.skip(reason="needs NVIDIA DALI")
    cuda = _has_cuda()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)
        if "dali" in item.keywords and not HAS_DALI:
            item.add_marker(skip_dali)


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
