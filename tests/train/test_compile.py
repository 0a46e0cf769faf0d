"""``torch.compile`` on the trainers' path, on a CPU with a backend that only counts graphs:
the benchmark's ``--compile`` compiles the model ``Trainer.step`` runs, the input normalization
adds no constant-building ops to the graph, and validation does not recompile the training model."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch._dynamo as dynamo

from affpipe.dist import DistContext


class GraphCounter:
    """A ``torch.compile`` backend that runs graphs eagerly and counts the compilations."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture
def counted_compile(monkeypatch):
    dynamo.reset()
    counter = GraphCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    yield counter
    dynamo.reset()


def test_bench_gpu_compile_compiles_the_model_the_step_runs(tmp_path, counted_compile, monkeypatch):
    from affpipe.bench import gpu as bench_gpu
    from affpipe.bench.common import REQUIRE_GPU_ENV

    monkeypatch.delenv(REQUIRE_GPU_ENV, raising=False)
    assert bench_gpu.main(["--out", str(tmp_path / "g"), "--cpu-smoke", "--compile", "--data", "fallback"]) == 0
    r = json.loads((tmp_path / "g" / "results.json").read_text())
    assert r["config"]["compile"] is True and r["sizes"][0]["synthetic"]["status"] == "ok"
    assert counted_compile.graphs >= 1  # the step ran the compiled model


def test_train_step_runs_the_compiled_model(index_dir, counted_compile):
    from affpipe.bench.cases import TrainStep
    from affpipe.index.build import load_index

    step = TrainStep(load_index(index_dir)[0], device="cpu", compile=True)
    assert step.model is step.trainer.model and step.model is not step.trainer.raw_model
    assert counted_compile.graphs == 0
    step(step.synthetic_batch(4, 32))
    assert counted_compile.graphs >= 1


def test_input_normalization_builds_no_constants_in_the_graph():
    from affpipe.models.model import ModelConfig, build_model

    model = build_model(ModelConfig(tasks=("va",)))
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    dynamo.reset()
    explained = dynamo.explain(model)(images)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    code = explained.graphs[0].code
    for rebuilt in ("torch.tensor(", "as_tensor", "wrapped_", "numpy"):
        assert rebuilt not in code, rebuilt
    assert "input_norm" in code  # the constants enter as the module's buffers
    dynamo.reset()


def test_validation_does_not_recompile_the_training_model(index_dir, shard_dir, tmp_path, counted_compile):
    from affpipe.index.build import load_index
    from affpipe.loaders import make_loader
    from affpipe.run.config import load_config
    from affpipe.scoring.tasks import label_statistics
    from affpipe.train.loop import validate
    from affpipe.train.trainer import Trainer

    cfg = load_config(None, {"task": "mtl", "shards": shard_dir, "out": tmp_path, "image_size": 32, "batch_size": 8,
                             "device": "cpu", "compile": True, "loader.num_workers": 0})
    trainer = Trainer.build(cfg, DistContext(rank=0, world=1, device=torch.device("cpu")),
                            label_statistics(load_index(index_dir)[0]))
    trainer.wrap()
    train = make_loader(shard_dir, "train", batch_size=8, train=True, backend="torch", image_size=32, num_workers=0,
                        normalize=False)
    batches = iter(train)
    trainer.step(next(batches))
    compiled = counted_compile.graphs
    assert compiled >= 1
    val = make_loader(shard_dir, "val", batch_size=7, train=False, backend="torch", image_size=32, num_workers=0,
                      normalize=False)
    assert len(list(val)[-1]) < 7  # the partial last batch is part of the pass
    validate(trainer, val, {})
    trainer.step(next(batches))
    assert counted_compile.graphs == compiled  # neither eval mode, the partial batch nor train mode again
