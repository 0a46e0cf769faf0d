"""Self-supervised pre-training on every frame, labelled or not: the methods and their recipes.

``recipe.py`` (``PretrainRecipe``, ``load_recipe``, ``make_method``, ``make_optimizer``,
``lr_at``), ``methods.py`` (the interface; SimSiam for CNNs), ``mae.py`` (MAE for timm ViTs),
``backbone.py`` (the per-frame trainer's backbone, built alike), ``stats.py`` (input checks,
collapse statistics), ``kind.py`` (the pre-training kind of run: ``affpipe pretrain``, its trainer
and k-NN probe). The data side is ``affpipe.loaders.pretrain``. Sits above ``train`` (its kind trains
through ``affpipe.train.loop``) and below ``temporal``.
"""

from affpipe.pretrain.mae import MAE
from affpipe.pretrain.methods import PretrainMethod, SimSiam
from affpipe.pretrain.recipe import (
    METHODS,
    MAEConfig,
    OptimConfig,
    PretrainRecipe,
    SimSiamConfig,
    default_recipe,
    load_recipe,
    lr_at,
    make_method,
    make_optimizer,
    set_lr,
)
from affpipe.pretrain.stats import COLLAPSE_RANK, COLLAPSE_SPREAD, as_input, collapse_stats

__all__ = [
    "COLLAPSE_RANK", "COLLAPSE_SPREAD", "MAE", "METHODS", "MAEConfig", "OptimConfig", "PretrainMethod", "PretrainRecipe",
    "SimSiam", "SimSiamConfig", "as_input", "collapse_stats", "default_recipe", "load_recipe", "lr_at",
    "make_method", "make_optimizer", "set_lr",
]
