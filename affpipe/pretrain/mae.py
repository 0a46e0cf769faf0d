"""MAE (He et al., CVPR 2022) on a timm ViT: mask 75% of the patches, encode the rest, decode
all, regress the normalized pixels of the masked ones.

About 150 lines on timm's ``VisionTransformer`` (its patch embedding, position embedding,
blocks and norm; timm's ``Block`` for the decoder) rather than ``lightly``: lightly 1.6's
``MaskedVisionTransformerTIMM``/``MAEDecoderTIMM`` do the same, but the package requires
``pytorch_lightning`` and ``hydra-core`` (and what they pull in) for a few hundred lines affpipe
would use, and its masking and loss sit in its own utils; the encoder here is the exact module
the per-frame trainer builds (``timm/NAME``), so its state dict loads there unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from affpipe.pretrain.backbone import build_backbone, is_vit
from affpipe.pretrain.methods import PretrainMethod
from affpipe.pretrain.stats import as_input


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position embedding: ``[grid_h * grid_w, dim]``."""
    if dim % 4:
        raise ValueError(f"mae.decoder_dim must be a multiple of 4, got {dim}")
    gh, gw = np.meshgrid(np.arange(grid[0], dtype=np.float64), np.arange(grid[1], dtype=np.float64), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def enc(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([enc(gh), enc(gw)], axis=1)).float()


class MAE(PretrainMethod):
    """Masked autoencoder; ``arch`` must be a timm ViT (``timm/vit_*``)."""

    name = "mae"

    def __init__(self, arch: str = "timm/vit_small_patch16_224", *, mask_ratio: float = 0.75,
                 norm_pix_loss: bool = True, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, image_size: int = 112) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mae.mask_ratio must be in (0, 1), got {mask_ratio}")
        backbone, _ = build_backbone(arch, image_size)
        if not is_vit(backbone):
            raise ValueError(f"method 'mae' needs a ViT backbone (timm/vit_*: patch tokens to mask); {arch!r} is "
                             "not one — use method 'simsiam' for a CNN")
        self.backbone = backbone
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        pe = backbone.patch_embed
        self.patch, self.grid = int(pe.patch_size[0]), tuple(int(g) for g in pe.grid_size)
        self.prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos", sincos_2d(decoder_dim, self.grid)[None], persistent=False)
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * 3)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``[N,3,H,W]`` → ``[N, L, p*p*3]`` (row-major patches, pixels then channels)."""
        n, c, h, w = images.shape
        p = self.patch
        x = images.reshape(n, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Encoder on a random ``1 - mask_ratio`` of the patches: ``(tokens, mask [N, L] 1 = masked, ids_restore)``."""
        enc = self.backbone
        x = enc.norm_pre(enc._pos_embed(enc.patch_embed(x)))
        prefix, tokens = x[:, :self.prefix], x[:, self.prefix:]
        n, length, dim = tokens.shape
        keep = max(1, int(length * (1 - self.mask_ratio)))
        noise = torch.rand(n, length, device=x.device, generator=generator)
        shuffle = noise.argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        tokens = tokens.gather(1, shuffle[:, :keep, None].expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        mask = mask.gather(1, restore)
        x = enc.norm(enc.blocks(torch.cat([prefix, tokens], 1)))
        return x, mask, restore

    def decode(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Predicted pixels ``[N, L, p*p*3]`` of every patch."""
        x = self.decoder_embed(x)
        prefix, tokens = x[:, :self.prefix], x[:, self.prefix:]
        n, length = restore.shape
        tokens = torch.cat([tokens, self.mask_token.expand(n, length - tokens.shape[1], -1)], 1)
        tokens = tokens.gather(1, restore[:, :, None].expand(-1, -1, tokens.shape[2])) + self.decoder_pos
        x = self.decoder_norm(self.decoder_blocks(torch.cat([prefix, tokens], 1)))
        return self.decoder_pred(x[:, self.prefix:])

    def loss(self, views: list[torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"loss", "recon"}``: mean squared error of the (per-patch normalized) pixels of the
        masked patches, over every view given (MAE's recipe uses one: crop and flip only)."""
        if not views:
            raise ValueError("mae needs at least one view")
        images = torch.cat([as_input(v, i) for i, v in enumerate(views)])
        latent, mask, restore = self.encode(images, generator)
        pred = self.decode(latent, restore)
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred - target) ** 2).mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return {"loss": loss, "recon": loss.detach()}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """timm's rule (MAE's ``param_groups_weight_decay``): no decay on 1-d tensors, position
        embeddings, class and mask tokens."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token", "reg_token"))
            (no_decay if skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
