"""A small ViT-style image classifier on ``F.scaled_dot_product_attention``.

Patch embedding (a patch_size-strided conv), a class token, learned position embeddings,
pre-norm transformer blocks (:class:`jacfast.models.transformer.TransformerBlock`), a final
LayerNorm and a linear head: on the class token (logits (B, C)), or on every patch token
(``per_patch=True``: logits (B, N, C), N = (H / patch_size) * (W / patch_size), a sequence
output for position selections). See :mod:`jacfast.models.transformer` for the attention
kernels and the exact estimator (``attention="math"`` or the SDPA math kernel).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from jacfast.models.transformer import TransformerBlock


class ViTClassifier(nn.Module):
    """x (B, in_channels, image_size, image_size) -> logits (B, num_classes), or (B, N, num_classes).

    Args:
        image_size: height and width of the input (a multiple of patch_size).
        patch_size: side of the square patches.
        in_channels: image channels.
        num_classes: logits per image (per patch with ``per_patch``).
        dim, depth, heads, mlp_ratio: transformer width, blocks, heads, MLP width / dim.
        per_patch: return per-patch logits (B, N, num_classes) instead of the class token's.
        attention: "sdpa" or "math" (see :class:`jacfast.models.transformer.Attention`).
    """

    def __init__(self, image_size: int = 16, patch_size: int = 4, in_channels: int = 3, num_classes: int = 10,
                 dim: int = 32, depth: int = 2, heads: int = 4, mlp_ratio: int = 2, *, per_patch: bool = False,
                 attention: str = "sdpa", dropout: float = 0.0):
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.num_patches = (image_size // patch_size) ** 2
        self.per_patch = per_patch
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, attention=attention, dropout=dropout)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, image_size, image_size) -> (B, num_classes) or (B, N, num_classes)."""
        want = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(tokens.dtype), tokens], 1) + self.pos
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        return self.head(h[:, 1:] if self.per_patch else h[:, 0])
