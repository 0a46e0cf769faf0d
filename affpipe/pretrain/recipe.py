"""A pre-training recipe: frozen dataclasses, loaded from TOML (``pipelines/pretrain_*.toml``).

Top-level keys (``method``, ``arch``, ``image_size``, ``epochs``, ``batch_size``, ``seed``), then
``[optim]``, ``[mae]`` or ``[simsiam]``, ``[data]`` (``affpipe.loaders.pretrain.PretrainData``)
and one ``[[views]]`` table per view (``affpipe.loaders.views.ViewConfig``). A key the recipe
does not know is an error naming the file and the key. Defaults are each method's published
ones (:func:`default_recipe`); the TOML files say where each comes from.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from affpipe.loaders.pretrain import PretrainData
from affpipe.loaders.views import ViewConfig

# The sections a run records (config.json) live beside the run's other configs.
from affpipe.run.config import MAEConfig, OptimConfig, SimSiamConfig

METHODS = ("mae", "simsiam")


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything a pre-training run is made of but its data paths."""

    method: str = "simsiam"
    arch: str = "resnet18"
    image_size: int = 112
    epochs: int = 100
    batch_size: int = 256
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    simsiam: SimSiamConfig = field(default_factory=SimSiamConfig)
    views: tuple[ViewConfig, ...] = (ViewConfig(), ViewConfig())
    data: PretrainData = field(default_factory=PretrainData)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if any(v.size != self.image_size for v in self.views):
            raise ValueError(f"every [[views]] size must be image_size {self.image_size}")
        if self.method == "simsiam" and len(self.views) != 2:
            raise ValueError(f"simsiam takes exactly 2 views, the recipe has {len(self.views)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (what a run's config.json and checkpoints record)."""
        return dataclasses.asdict(self)


def default_recipe(method: str) -> PretrainRecipe:
    """The published defaults of ``method`` (see ``pipelines/pretrain_<method>.toml``)."""
    if method == "mae":
        return PretrainRecipe(method="mae", arch="timm/vit_small_patch16_224", epochs=800, batch_size=4096,
                              optim=OptimConfig("adamw", 1.5e-4, 0.05, (0.9, 0.95), 0.9, 40.0, 0.0),
                              views=(ViewConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),))
    if method == "simsiam":
        return PretrainRecipe(method="simsiam", epochs=100, batch_size=512,
                              optim=OptimConfig("sgd", 0.05, 1e-4, (0.9, 0.999), 0.9, 0.0, 0.0))
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a table")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (known: {sorted(known)})")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def load_recipe(path: Path | str, **overrides: Any) -> PretrainRecipe:
    """The recipe in ``path`` over its method's defaults, then ``overrides`` (flags; top-level keys)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    raw.update({k: v for k, v in overrides.items() if v is not None})
    base = default_recipe(raw.get("method", "simsiam"))
    top = {k: v for k, v in raw.items() if k not in ("optim", "mae", "simsiam", "views", "data")}
    kw = _build(PretrainRecipe, top, str(path))
    try:
        for name, cls in (("optim", OptimConfig), ("mae", MAEConfig), ("simsiam", SimSiamConfig), ("data", PretrainData)):
            if name in raw:
                kw[name] = dataclasses.replace(getattr(base, name), **_build(cls, raw[name], f"{path} [{name}]"))
        if "views" in raw:
            kw["views"] = tuple(ViewConfig.from_dict({**{"size": kw.get("image_size", base.image_size)}, **v})
                                for v in raw["views"])
        return dataclasses.replace(base, **kw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def make_method(recipe: PretrainRecipe):
    """The recipe's method (an ``nn.Module`` with ``loss``/``backbone_state_dict``/``collapse``)."""
    if recipe.method == "mae":
        from affpipe.pretrain.mae import MAE

        m = recipe.mae
        return MAE(recipe.arch, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss, decoder_dim=m.decoder_dim,
                   decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads, image_size=recipe.image_size)
    from affpipe.pretrain.methods import SimSiam

    s = recipe.simsiam
    return SimSiam(recipe.arch, proj_dim=s.proj_dim, pred_dim=s.pred_dim, proj_layers=s.proj_layers,
                   image_size=recipe.image_size)


def make_optimizer(method, recipe: PretrainRecipe, world_size: int = 1) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``method.param_groups`` at the peak learning rate for the
    global batch (``batch_size * world_size``)."""
    o = recipe.optim
    lr = o.lr(recipe.batch_size * world_size)
    groups = method.param_groups(o.weight_decay)
    for g in groups:
        g["initial_lr"] = lr
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=o.betas)
    return torch.optim.SGD(groups, lr=lr, momentum=o.momentum)


def lr_at(recipe: PretrainRecipe, epoch: float, world_size: int = 1) -> float:
    """The learning rate at (fractional) ``epoch``: linear warm-up, then half-cosine to ``min_lr``
    (MAE's per-iteration ``adjust_learning_rate``; SimSiam's cosine with no warm-up)."""
    o = recipe.optim
    peak = o.lr(recipe.batch_size * world_size)
    if epoch < o.warmup_epochs:
        return peak * epoch / o.warmup_epochs
    span = max(recipe.epochs - o.warmup_epochs, 1e-9)
    return o.min_lr + (peak - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (epoch - o.warmup_epochs) / span)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply ``lr`` to every group but those marked ``fix_lr`` (SimSiam's predictor)."""
    for g in optimizer.param_groups:
        if not g.get("fix_lr"):
            g["lr"] = lr


def run_config(recipe: PretrainRecipe, **run: Any):
    """The ``TrainConfig`` of a pre-training run of ``recipe``: its data an ``SSLData`` (so the
    registry picks the pre-training kind), the recipe's common keys as the run's (``epochs``,
    ``batch_size``, ``image_size``, ``seed``, the backbone as ``model.arch``), ``run`` the run's
    own keys (``shards``, ``index``, ``out``, ``device``, ``ckpt_every``, ... as ``TrainConfig.of`` takes
    them; ``probe_k``/``probe_frames`` go to the data)."""
    from affpipe.run.config import SSLData, TrainConfig

    probe = {k: run.pop(k) for k in ("probe_k", "probe_frames") if run.get(k) is not None}
    for k in ("probe_k", "probe_frames"):
        run.pop(k, None)
    data = SSLData(run.pop("shards", None), run.pop("index", None), recipe.method, recipe.data, recipe.optim,
                   recipe.mae, recipe.simsiam, recipe.views, **probe)
    model = {"arch": recipe.arch, **(run.pop("model", None) or {})}
    return TrainConfig.of(pretrain=data, task=run.pop("task", "mtl"), epochs=recipe.epochs, batch_size=recipe.batch_size,
                          image_size=recipe.image_size, seed=recipe.seed, lr=recipe.optim.lr(recipe.batch_size),
                          model=model, **run)


def recipe_of(cfg) -> PretrainRecipe:
    """The ``PretrainRecipe`` a pre-training run's ``TrainConfig`` records (see :func:`run_config`)."""
    d = cfg.data
    return PretrainRecipe(method=d.method, arch=cfg.model.arch, image_size=cfg.image_size, epochs=cfg.epochs,
                          batch_size=cfg.batch_size, seed=cfg.seed, optim=d.optim, mae=d.mae, simsiam=d.simsiam,
                          views=d.views, data=d.data)
