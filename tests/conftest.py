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


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the measured marks must be there
def pytest_collection_modifyitems(config, items):
    _mark_measured_slow(items)
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


# ---- trained artifacts, built once per test session (the cost budget) ------------------------
# A per-frame MTL run on ``shard_dir``, a feature table embedded from it and a temporal head on
# that table: tiny images, two steps, the torch loader in-process. Tests that only read use them
# as they are; tests that write into a run folder take a copy (``copy_world``).

from support import TINY_RUN, TINY_TEMPORAL  # noqa: E402


@pytest.fixture(scope="session")
def trained_world(index_dir, tmp_path_factory) -> Path:
    """``world/{index, shards, feats, runs/frame, runs/temporal}``, each recording what it was
    made from (paths relative to it, so a copy of the whole world works as the original)."""
    import shutil

    from affpipe.loaders import LoaderConfig
    from affpipe.run.config import TrainConfig, load_config
    from affpipe.run.folder import RunFolder
    from affpipe.runs.embed import EmbedConfig, embed
    from affpipe.runs.train import train
    from affpipe.shards.write import ShardConfig, write_shards

    w = tmp_path_factory.mktemp("trained") / "world"
    shutil.copytree(index_dir, w / "index")
    write_shards(ShardConfig(index=w / "index", out=w / "shards", split="all", samples_per_shard=100, workers=1))
    frame = train(load_config(None, {**TINY_RUN, "shards": w / "shards", "out": w / "runs" / "frame"}))
    embed(EmbedConfig(source=str(RunFolder(frame).best), shards=w / "shards", out=w / "feats", batch_size=64,
                      device="cpu", loader=LoaderConfig(backend="torch", num_workers=0)))
    train(TrainConfig.of(task="mtl", features=w / "feats", out=w / "runs" / "temporal", epochs=1, batch_size=4,
                         device="cpu", temporal=TINY_TEMPORAL))
    return w


@pytest.fixture()
def copy_world(trained_world, tmp_path) -> Path:
    """A private copy of ``trained_world`` (for tests that write into a run or move data)."""
    import shutil

    dst = tmp_path / "world"
    shutil.copytree(trained_world, dst, symlinks=True)
    return dst


# ---- the cost budget: measured durations decide what `make test-fast` leaves out ---------------
# tests/durations.json holds each test's measured seconds (``scripts/test-durations.py`` writes it
# from a whole run on 2 idle cores). A test over ``FAST_LIMIT_S`` is marked ``slow`` unless it is
# its file's fastest test, so the edit loop (``-m 'not slow'``) still touches every module.

FAST_LIMIT_S = 0.7
_DURATIONS = Path(__file__).with_name("durations.json")


def _measured_slow(items) -> set[str]:
    import json

    if not _DURATIONS.is_file():
        return set()
    seconds: dict[str, float] = json.loads(_DURATIONS.read_text()).get("seconds", {})
    fastest: dict[str, tuple[float, str]] = {}
    for item in items:
        t = seconds.get(item.nodeid)
        if t is not None and (item.fspath not in fastest or t < fastest[item.fspath][0]):
            fastest[item.fspath] = (t, item.nodeid)
    keep = {nodeid for _, nodeid in fastest.values()}
    return {item.nodeid for item in items
            if seconds.get(item.nodeid, 0.0) > FAST_LIMIT_S and item.nodeid not in keep}


def _mark_measured_slow(items) -> None:
    slow = _measured_slow(items)
    for item in items:
        if item.nodeid in slow and "slow" not in item.keywords:
            item.add_marker(pytest.mark.slow)
