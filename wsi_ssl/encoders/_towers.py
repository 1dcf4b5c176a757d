"""The zoo's modules: a timm ViT ``trunk`` pooled the way each model publishes its embedding.

``build_zoo(config)`` reads ``config.arch`` (``timm/<arch>``) and ``config.arch_kwargs``: the
timm constructor arguments, with classes written as dotted names (``"timm.layers.SwiGLUPacked"``,
``"torch.nn.SiLU"``) so the config stays JSON, plus three zoo keys that timm does not take:

- ``output``: ``"cls"`` (the final-norm class token) or ``"cls+mean"`` (the class token
  concatenated with the mean of the patch tokens, class and register tokens excluded);
- ``tower``: ``"conch"`` for CONCH v1.5's attention-pooled vision tower;
- ``layer_norm_eps``: every LayerNorm's epsilon when the published model uses another one
  than timm's 1e-6 (Hugging Face ``ViTModel``: 1e-12).
"""

from __future__ import annotations

import importlib
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from wsi_ssl.encoders.config import EncoderConfig
from wsi_ssl.errors import ConfigError

__all__ = ["OUTPUTS", "AttentionPool", "ConchTower", "PooledViT", "build_zoo", "resolve_class"]

OUTPUTS = ("cls", "cls+mean")
# constructor arguments that name a class, and the modules such a class may come from
_CLASS_ARGS = ("mlp_layer", "act_layer", "norm_layer", "block_fn", "embed_layer")
_CLASS_MODULES = ("timm.layers", "torch.nn")


def resolve_class(value: Any) -> Any:
    """``"timm.layers.SwiGLUPacked"`` -> the class (from timm.layers or torch.nn only)."""
    if not isinstance(value, str):
        return value
    module, _, name = value.rpartition(".")
    if module not in _CLASS_MODULES:
        raise ConfigError(
            f"class {value!r}: only classes from {', '.join(_CLASS_MODULES)} may be named"
        )
    try:
        return getattr(importlib.import_module(module), name)
    except AttributeError as err:
        raise ConfigError(f"class {value!r}: no such class in {module}") from err


class PooledViT(nn.Module):
    """A timm ViT whose final-norm tokens are pooled as the model card prescribes."""

    def __init__(self, trunk: nn.Module, output: str) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ConfigError(f"output must be one of {', '.join(OUTPUTS)}; got {output!r}")
        self.trunk = trunk
        self.output = output
        self.prefix = int(cast(int, trunk.num_prefix_tokens))  # class + register tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # type: ignore[operator]
        cls = tokens[:, 0]
        if self.output == "cls":
            return cls
        return torch.cat([cls, tokens[:, self.prefix :].mean(dim=1)], dim=-1)


class AttentionPool(nn.Module):
    """Learned queries attending over the tokens (CoCa's attentional pooler, as in CONCH)."""

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int = 1) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, h, n, d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q = self.to_q(self.ln_q(self.query)).expand(len(tokens), -1, -1)
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, queries, dim)


class ConchTower(nn.Module):
    """CONCH v1.5's vision tower: ViT-L/16 tokens -> attention pool -> LayerNorm (768-d)."""

    def __init__(self, trunk: nn.Module, dim: int = 768, heads: int = 8) -> None:
        super().__init__()
        self.trunk = trunk
        width = int(cast(int, trunk.num_features))
        self.attn_pool_contrast = AttentionPool(dim, width, heads)
        self.ln_contrast = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # type: ignore[operator]
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def build_zoo(config: EncoderConfig) -> nn.Module:
    """The module of a zoo preset (random init; weights are loaded after)."""
    import timm

    kwargs = dict(config.arch_kwargs)
    output = kwargs.pop("output", "cls")
    tower = kwargs.pop("tower", None)
    eps = kwargs.pop("layer_norm_eps", None)
    for key in _CLASS_ARGS:
        if key in kwargs:
            kwargs[key] = resolve_class(kwargs[key])
    arch = config.arch.removeprefix("timm/")
    trunk = timm.create_model(
        arch, pretrained=False, num_classes=0, img_size=config.input_size, **kwargs
    )
    if eps is not None:
        for m in trunk.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = float(eps)
    if tower == "conch":
        return ConchTower(trunk)
    if tower is not None:
        raise ConfigError(f"tower {tower!r}: only 'conch' is known")
    return PooledViT(trunk, output)
