"""TransMIL-style transformer MIL.

Shao et al., "TransMIL: Transformer based Correlated Multiple Instance Learning for Whole
Slide Image Classification", NeurIPS 2021 (arXiv:2106.00908): tiles are projected, the
sequence is padded to a square by repeating its first tokens, a class token is prepended,
and two pre-norm self-attention layers with a Pyramid Position Encoding Generator (PPEG:
depthwise 7x7, 5x5 and 3x3 convolutions over the tiles laid out on the square) between them
correlate the tiles; the class token is classified.

Attention is the Nyström approximation (Xiong et al., "Nyströmformer", AAAI 2021) with 256
landmarks, as in the paper, for sequences longer than 4096 tokens (16 x landmarks), and exact
softmax attention (``scaled_dot_product_attention``) for shorter ones, where the landmarks'
pseudo-inverse costs more than it saves; both use the same weights. Unlike the paper's ``NystromAttention`` there is no residual
convolution over the values. The tile attention returned is the class token's attention to
each tile in the last layer, averaged over heads (clipped at 0 and renormalised under the
approximation), with the weights of padding copies added to the tiles they repeat.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsi_ssl.mil.config import MILConfig
from wsi_ssl.mil.models.base import MILModel
from wsi_ssl.mil.models.registry import register_model

__all__ = ["PPEG", "TransLayer", "TransMIL", "nystrom_attention"]


def _pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Iterative Moore-Penrose pseudo-inverse of softmax matrices (Razavi et al. 2014), as in
    Nyströmformer."""
    abs_x = x.abs()
    z = x.transpose(-1, -2) / (abs_x.sum(-1).amax() * abs_x.sum(-2).amax())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


def nystrom_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmarks: int, *, cls_row: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Nyström approximation of ``softmax(q k^T / sqrt(d)) v`` for (B, H, L, d) inputs.

    The sequence is zero-padded at the front to a multiple of ``landmarks``; landmarks are the
    means of consecutive segments of queries and keys. Returns the output (B, H, L, d) and,
    with ``cls_row``, the approximate attention row of token 0 over the L tokens (B, H, L).
    """
    b, h, n, d = q.shape
    pad = (-n) % landmarks
    if pad:
        q, k, v = (F.pad(t, (0, 0, pad, 0)) for t in (q, k, v))
    q = q / math.sqrt(d)
    seg = q.shape[2] // landmarks
    q_l = q.reshape(b, h, landmarks, seg, d).mean(dim=3)
    k_l = k.reshape(b, h, landmarks, seg, d).mean(dim=3)
    kernel1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
    kernel2 = _pinv(torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1))
    kernel3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)
    out = (kernel1 @ kernel2) @ (kernel3 @ v)
    row = None
    if cls_row:
        row = ((kernel1[:, :, pad : pad + 1] @ kernel2) @ kernel3)[:, :, 0, pad:]
    return out[:, :, pad:], row


class TransLayer(nn.Module):
    """``x + MHSA(LayerNorm(x))``, as TransMIL's ``TransLayer`` (no MLP block).

    Args:
        dim: token width.
        n_heads: attention heads (``dim`` must be a multiple).
        dropout: dropout on the attention weights (exact attention) and the output.
        landmarks: Nyström landmarks for sequences longer than 16 times this (None: always
            exact attention).
    """

    def __init__(
        self, dim: int, n_heads: int, dropout: float = 0.1, landmarks: int | None = 256
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.landmarks = landmarks
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(
        self, x: torch.Tensor, *, cls_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` (B, L, C) -> (B, L, C), and the class token's weights (B, L) when asked."""
        b, n, c = x.shape
        q, k, v = (
            self.qkv(self.norm(x)).view(b, n, 3, self.n_heads, c // self.n_heads).unbind(dim=2)
        )
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d)
        p = self.dropout if self.training else 0.0
        weights = None
        if self.landmarks is not None and n > 16 * self.landmarks:
            y, row = nystrom_attention(q, k, v, self.landmarks, cls_row=cls_attention)
            if row is not None:
                row = row.clamp_min(0)
                weights = (row / row.sum(-1, keepdim=True).clamp_min(1e-12)).mean(dim=1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            if cls_attention:
                scores = (q[:, :, :1] @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
                weights = torch.softmax(scores, dim=-1).mean(dim=1)[:, 0]  # (B, L)
        y = self.out(y.transpose(1, 2).reshape(b, n, c))
        return x + F.dropout(y, p, self.training), weights


class PPEG(nn.Module):
    """Pyramid Position Encoding Generator: depthwise 7/5/3 convolutions plus identity.

    Args:
        dim: token width (one group per channel).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """``x`` (B, 1 + side², C) with the class token first -> the same shape."""
        b, _, c = x.shape
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(b, c, side, side)
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILModel):
    """Transformer MIL with a class token and PPEG.

    Args:
        in_dim: embedding width D.
        n_classes: number of classes.
        hidden_dim: token width.
        n_heads: attention heads.
        n_layers: transformer layers (PPEG follows the first).
        dropout: dropout on attention and projections.
        landmarks: Nyström landmarks (None: exact attention at any length).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 256,
        n_heads: int = 8,
        n_layers: int = 2,
        dropout: float = 0.1,
        landmarks: int | None = 256,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        nn.init.normal_(self.cls_token, std=1e-6)
        self.layers = nn.ModuleList(
            TransLayer(hidden_dim, n_heads, dropout, landmarks) for _ in range(n_layers)
        )
        self.ppeg = PPEG(hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = bag.shape[0]
        h = self.project(bag)
        side = math.ceil(math.sqrt(n))
        index = torch.arange(side * side, device=h.device) % n  # pad by repeating tiles
        x = torch.cat([self.cls_token, h[index][None]], dim=1)
        weights: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            x, weights = layer(x, cls_attention=i == len(self.layers) - 1)
            if i == 0:
                x = self.ppeg(x, side)
        logits = self.classifier(self.norm(x[:, 0]))[0]
        assert weights is not None
        per_tile = torch.zeros(n, device=h.device, dtype=weights.dtype)
        per_tile.index_add_(0, index, weights[0, 1:])
        return logits, per_tile / per_tile.sum().clamp_min(1e-12)


@register_model("transmil")
def transmil(in_dim: int, n_classes: int, config: MILConfig) -> TransMIL:
    return TransMIL(
        in_dim, n_classes, config.hidden_dim, config.n_heads, config.n_layers, config.dropout
    )
