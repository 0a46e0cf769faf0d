"""The pre-training methods' common interface and the joint-embedding method (SimSiam).

A method is an ``nn.Module`` holding the backbone it trains (``self.backbone``, built as the
per-frame trainer builds it: ``affpipe.pretrain.backbone``) and:

* ``loss(views) -> {"loss": scalar, <parts>}`` — ``views`` is the loader's list of uint8 (or
  normalized float) ``[N,3,H,W]`` tensors; the run only calls ``backward()`` on ``loss`` and
  logs the parts (tensors: nothing here makes a GPU host wait);
* ``backbone_state_dict()`` — the backbone's tensors, loadable by ``--weights``/``--init``;
* ``embed(images)`` — the backbone's pooled features, for ``collapse(views)``
  (``affpipe.pretrain.stats.collapse_stats`` of the first view's embeddings);
* ``param_groups(weight_decay)`` — optimizer groups (no weight decay on biases and norms where
  the recipe says so; SimSiam's predictor at a fixed learning rate).

Why SimSiam (Chen & He, CVPR 2021) for CNN backbones: it needs neither negatives (SimCLR,
MoCo: large batches or a queue), nor a momentum encoder (BYOL: a second copy of the network
in memory and compute), nor multi-crop and centering (DINO: 2 global + several local views per
frame, ~2-4x the decode work of two views — the loader's bottleneck on 2 cores), nor a
covariance term whose estimate needs a large batch (VICReg); its paper shows it working from
batch 64 up, with plain SGD. On one GPU or a 2-core CPU, two views and small batches are what
fits. Its collapse mode is known and measured by the same statistic the paper plots (the std of
the l2-normalized output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from affpipe.pretrain.backbone import build_backbone
from affpipe.pretrain.stats import as_input, collapse_stats


class PretrainMethod(nn.Module):
    """The interface of every method (see the module docstring)."""

    name = "base"
    backbone: nn.Module

    def loss(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``loss(views)``: what a DDP-wrapped method runs."""
        return self.loss(views)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's tensors (key names of the per-frame backbone; no classifier, no heads)."""
        return {k: v.detach().clone().contiguous() for k, v in self.backbone.state_dict().items()}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features of ``images`` (uint8 or normalized float)."""
        return self.backbone(as_input(images, 0))

    @torch.no_grad()
    def collapse(self, views: list[torch.Tensor]) -> dict[str, float]:
        """Collapse statistics of the first view's embeddings (eval mode, restored after)."""
        was = self.training
        self.eval()
        try:
            return collapse_stats(self.embed(views[0]))
        finally:
            self.train(was)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices and kernels, none on biases and norm weights (1-d tensors)."""
        decay, no_decay = [], []
        for _, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _mlp(dims: list[int], *, last_bn_affine: bool | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:], strict=False)):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=last and last_bn_affine is None))
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn_affine is not None:
            layers.append(nn.BatchNorm1d(b, affine=last_bn_affine))
    return nn.Sequential(*layers)


class SimSiam(PretrainMethod):
    """SimSiam: a projector (``proj_layers`` layers of ``proj_dim``, BN each, the last without
    affine), a predictor (``proj_dim`` → ``pred_dim`` → ``proj_dim``) and the symmetric negative
    cosine loss with a stop-gradient on the target branch."""

    name = "simsiam"

    def __init__(self, arch: str = "resnet18", *, proj_dim: int = 2048, pred_dim: int = 512, proj_layers: int = 3,
                 image_size: int = 112) -> None:
        super().__init__()
        if proj_layers < 2:
            raise ValueError(f"simsiam.proj_layers must be >= 2, got {proj_layers}")
        self.backbone, width = build_backbone(arch, image_size)
        self.projector = _mlp([width] + [proj_dim] * proj_layers, last_bn_affine=False)
        self.predictor = _mlp([proj_dim, pred_dim, proj_dim], last_bn_affine=None)

    def loss(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"loss", "cos", "z_std"}``: loss in [-1, 1] (-1: the predictions match the targets),
        ``z_std`` the per-dimension std of the normalized projections (collapse: → 0)."""
        if len(views) != 2:
            raise ValueError(f"simsiam takes exactly 2 views per frame, got {len(views)} (set two [[views]] in the recipe)")
        x = torch.cat([as_input(v, i) for i, v in enumerate(views)])
        z = self.projector(self.backbone(x))
        p = self.predictor(z)
        z1, z2 = z.detach().chunk(2)
        p1, p2 = p.chunk(2)
        cos = 0.5 * (F.cosine_similarity(p1, z2, dim=1).mean() + F.cosine_similarity(p2, z1, dim=1).mean())
        return {"loss": -cos, "cos": cos.detach(), "z_std": F.normalize(z1, dim=1).std(0).mean()}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The projector's output (what SimSiam's collapse statistic is measured on)."""
        return self.projector(self.backbone(as_input(images, 0)))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """SimSiam's: weight decay on every parameter; the predictor keeps its initial learning
        rate (``fix_lr``: the schedule skips it), as the paper's default."""
        pred = {id(p) for p in self.predictor.parameters()}
        rest = [p for p in self.parameters() if id(p) not in pred]
        return [{"params": rest, "weight_decay": weight_decay},
                {"params": list(self.predictor.parameters()), "weight_decay": weight_decay, "fix_lr": True}]
