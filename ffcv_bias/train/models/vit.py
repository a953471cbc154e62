"""ViT-Small/16 (Dosovitskiy et al. 2021; DeiT-S sizes) with timm's state_dict names.

    cls_token [1, 1, 384]   pos_embed [1, 1 + (img_size / 16)^2, 384]
    patch_embed.proj        16x16 stride-16 conv, 3 -> 384
    blocks.0..11            pre-norm transformer blocks: norm1, attn.qkv, attn.proj,
                            norm2, mlp.fc1 (384 -> 1536), mlp.fc2 (1536 -> 384)
    norm                    final LayerNorm; the class token's output feeds `head`

Checked key by key against tests/data/vit_small_keys.txt (timm's
`vit_small_patch16_224`, 22,050,664 parameters at 1000 classes).

`img_size` (default 224) sets the position-embedding grid. An input of another size (a
multiple of the patch size) also works: the grid part of `pos_embed` is resized
bicubically on the fly, so tests can run at 32 px and low-resolution training phases need
no other model. `no_weight_decay()` lists `pos_embed` and `cls_token`. `drop_path` rises
linearly over the 12 blocks; `dropout` acts on the class-token features before `head`.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import DropPath, linear_drop_path_rates

LAYER_NORM_EPS = 1e-6


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images):
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size "
                             f"{self.patch_size}")
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, num_patches, dim]


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens):
        batch, length, dim = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, length, head_dim]
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, tokens):
        tokens = tokens + self.drop_path(self.attn(self.norm1(tokens)))
        return tokens + self.drop_path(self.mlp(self.norm2(tokens)))


class VisionTransformer(nn.Module):
    def __init__(self, num_classes=1000, *, img_size=224, patch_size=16, embed_dim=384,
                 depth=12, num_heads=6, dropout=0.0, drop_path=0.0):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        grid_size = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid_size * grid_size, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        rates = linear_drop_path_rates(drop_path, depth)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, drop_path=rate)
                                      for rate in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self):
        # ViT/DeiT practice: N(0, 0.02) weights, a near-zero class token. (They write
        # trunc_normal_(std=0.02), whose default bounds +-2 are 100 std away: plain normal_.)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def position_embedding(self, grid_height, grid_width):
        """pos_embed for a grid_height x grid_width patch grid (resized if needed)."""
        class_position, grid_positions = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        stored_side = math.isqrt(grid_positions.shape[1])
        if (grid_height, grid_width) == (stored_side, stored_side):
            return self.pos_embed
        dim = grid_positions.shape[-1]
        grid = grid_positions.reshape(1, stored_side, stored_side, dim).permute(0, 3, 1, 2)
        # bicubic with antialiasing, as timm resamples it: weights trained there transfer
        grid = F.interpolate(grid, size=(grid_height, grid_width), mode="bicubic",
                             antialias=True, align_corners=False)
        grid_positions = grid.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, dim)
        return torch.cat([class_position, grid_positions], dim=1)

    def forward_features(self, images):
        """The class token's final, normalized embedding: [B, embed_dim]."""
        patch_size = self.patch_embed.patch_size
        grid_height, grid_width = images.shape[-2] // patch_size, images.shape[-1] // patch_size
        tokens = self.patch_embed(images)
        class_tokens = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([class_tokens, tokens], dim=1)
        tokens = tokens + self.position_embedding(grid_height, grid_width)
        return self.norm(self.blocks(tokens))[:, 0]

    def forward(self, images):
        return self.head(self.dropout(self.forward_features(images)))


def vit_small(num_classes=1000, **kwargs):
    return VisionTransformer(num_classes, patch_size=16, embed_dim=384, depth=12,
                             num_heads=6, **kwargs)
