"""Built-in architectures in plain torch (no timm/torchvision), random-init, for tests and
benchmarks: a small CNN and a ViT (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2021).
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_ssl.encoders.config import EncoderConfig
from wsi_ssl.encoders.registry import register_encoder

__all__ = ["SmallCNN", "ViT"]


class SmallCNN(nn.Module):
    """Four strided 3x3 conv + BN-free ReLU stages and global average pooling."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.num_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


class ViT(nn.Module):
    """A pre-norm Vision Transformer returning the final-norm class token."""

    def __init__(
        self,
        img_size: int,
        patch_size: int = 16,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        n = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            int(dim * mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.num_features = dim
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]


@register_encoder(
    "random-cnn",
    arch="builtin/small_cnn",
    input_size=224,
    embed_dim=64,
    source="random",
    description="small random-init CNN (tests; fast on CPU)",
)
def random_cnn(config: EncoderConfig) -> nn.Module:
    return SmallCNN()


@register_encoder(
    "random-vit-tiny",
    arch="builtin/vit_tiny_patch16",
    input_size=224,
    embed_dim=192,
    source="random",
    description="random-init ViT-Ti/16 in plain torch (benchmarks)",
)
def random_vit_tiny(config: EncoderConfig) -> nn.Module:
    return ViT(config.input_size, 16, 192, 12, 3)


@register_encoder(
    "random-vit-small",
    arch="builtin/vit_small_patch16",
    input_size=224,
    embed_dim=384,
    source="random",
    precision="bf16",
    description="random-init ViT-S/16 in plain torch, bf16 on CUDA (benchmarks)",
)
def random_vit_small(config: EncoderConfig) -> nn.Module:
    return ViT(config.input_size, 16, 384, 12, 6)
