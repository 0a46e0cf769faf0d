"""What every method shares: uint8 views → normalized float, the NaN refusal, collapse statistics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from affpipe.batch import MEAN, STD

# Collapse: the embeddings' variance across the batch falls below this share of their mean
# squared norm (every frame maps to nearly one point), or their effective rank falls to ~1 (every
# frame on one line). Healthy embeddings keep a spread of ~0.1-1 and a rank near min(N, d).
COLLAPSE_SPREAD = 1e-4
COLLAPSE_RANK = 1.5


def as_input(view: torch.Tensor, index: int) -> torch.Tensor:
    """A view as the backbone's normalized float input: uint8 ``[N,3,H,W]`` is scaled with the
    ImageNet statistics (as the per-frame models' first op); float is taken as already normalized.
    A non-finite float value is an error naming the view and the first sample (never a NaN loss
    several steps later)."""
    if view.dim() != 4 or view.shape[1] != 3:
        raise ValueError(f"view {index}: expected [N, 3, H, W], got shape {tuple(view.shape)}")
    if view.dtype == torch.uint8:
        mean = torch.tensor(MEAN, device=view.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(STD, device=view.device).view(1, 3, 1, 1) * 255
        return (view.float() - mean) / std
    if not view.is_floating_point():
        raise ValueError(f"view {index}: expected uint8 or float images, got {view.dtype}")
    bad = ~torch.isfinite(view.flatten(1)).all(1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"view {index}: {int(bad.sum())} image(s) hold NaN or infinite values (first: sample "
                         f"{first} of the batch); check the loader's normalization")
    return view


def collapse_stats(z: torch.Tensor) -> dict[str, float]:
    """Collapse statistics of embeddings ``z [N, d]``:

    * ``std``: the mean per-dimension std of the l2-normalized embeddings (SimSiam, Chen & He
      2021, Fig. 2: ~1/sqrt(d) when spread over the sphere, 0 when collapsed) and ``std_ratio``
      (that times sqrt(d));
    * ``spread``: variance across the batch / mean squared norm (0: one point);
    * ``rank``: effective rank (exp of the entropy of the centred singular values), 1..min(N, d);
    * ``collapsed``: ``spread < COLLAPSE_SPREAD`` or ``rank < COLLAPSE_RANK``.
    """
    z = z.detach().float()
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"collapse statistics need [N >= 2, d] embeddings, got {tuple(z.shape)}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("collapse statistics: the embeddings hold NaN or infinite values")
    zn = F.normalize(z, dim=1)
    std = float(zn.std(dim=0).mean())
    centred = z - z.mean(0)
    spread = float(centred.pow(2).sum(1).mean() / z.pow(2).sum(1).mean().clamp_min(1e-12))
    sv = torch.linalg.svdvals(centred)
    total = float(sv.sum())
    if total <= 1e-6 * max(float(z.norm(dim=1).mean()), 1e-12) * z.shape[0] ** 0.5:
        rank = 1.0  # no variation at all
    else:
        p = sv / total
        rank = float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
    return {"std": std, "std_ratio": std * math.sqrt(z.shape[1]), "spread": spread, "rank": rank,
            "collapsed": spread < COLLAPSE_SPREAD or rank < COLLAPSE_RANK}
