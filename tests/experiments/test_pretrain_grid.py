"""The pre-training question in the grid and the report (issue 26 item 6): the grid file parses,
pre-training runs are labelled as probes (never compared as models with heads), and an init is
compared with random only at the same labelled fraction."""

from __future__ import annotations

from affpipe.experiments.compare import Cell, variant_pairs
from affpipe.experiments.grid import DEFAULT_GRID, load_grid
from affpipe.experiments.runs import run_label
from affpipe.pretrain.recipe import default_recipe, run_config
from affpipe.run.config import to_dict


def test_the_pretrain_grid_parses_with_its_init_and_fraction_cells():
    grid = load_grid(DEFAULT_GRID.parent / "pretrain.toml")
    by = {r.name: r for r in grid.runs}
    assert by["mtl_ssl_f25"].init_from == "ssl_all" and by["mtl_ssl_f25"].overrides["label_fraction"] == 0.25
    assert by["ssl_imagenet"].needs == ("imagenet",) and by["mtl_imagenet_ssl_f100"].init_from == "ssl_imagenet"


def test_a_pretrain_run_is_labelled_as_a_probe_and_fractions_pair_alike():
    ssl = run_label(to_dict(run_config(default_recipe("simsiam"), shards="s")))
    assert ssl.pretrain == "simsiam" and not ssl.per_frame and "probe" in ssl.label()
    base = {"task": "mtl", "shards": "s", "model": {"init": "random"}}
    cells = [Cell(name, run_label({**base, **extra}), []) for name, extra in (
        ("r25", {"label_fraction": 0.25}), ("s25", {"label_fraction": 0.25, "model": {"init": "runs/ssl_all/best.pt"}}),
        ("r100", {}), ("s100", {"model": {"init": "runs/ssl_all/best.pt"}}), ("ssl", to_dict(run_config(
            default_recipe("simsiam"), shards="s"))))]
    pairs = {(c.name, ref.name) for _, c, ref in variant_pairs(cells)}
    assert pairs == {("s25", "r25"), ("s100", "r100")}
