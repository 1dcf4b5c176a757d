"""Gated attention MIL (ABMIL).

Ilse, Tomczak and Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018
(arXiv:1802.04712), eq. 9: tile embeddings ``h_k`` are pooled with weights

    a_k = softmax_k( w^T (tanh(V h_k) ⊙ sigm(U h_k)) ),    z = Σ_k a_k h_k,

and the slide is classified from ``z``. As in CLAM (Lu et al., Nat. Biomed. Eng. 2021), frozen
encoder embeddings first pass through a trainable fully connected layer with ReLU and dropout.
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_ssl.mil.config import MILConfig
from wsi_ssl.mil.models.base import MILModel
from wsi_ssl.mil.models.registry import register_model

__all__ = ["ABMIL", "GatedAttention"]


class GatedAttention(nn.Module):
    """The gated attention pooling weights of Ilse et al. (2018), eq. 9.

    Args:
        dim: width of the tile embeddings ``h_k``.
        attention_dim: width ``L`` of the ``V`` and ``U`` projections.
        dropout: dropout on both gates (CLAM's ``Attn_Net_Gated``).
    """

    def __init__(self, dim: int, attention_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Linear(dim, attention_dim)
        self.U = nn.Linear(dim, attention_dim)
        self.w = nn.Linear(attention_dim, 1)
        self.dropout = nn.Dropout(dropout)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention scores (N,)."""
        gate = torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))
        return self.w(self.dropout(gate)).squeeze(-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Attention weights (N,) summing to 1 over the bag."""
        return torch.softmax(self.scores(h), dim=0)


class ABMIL(MILModel):
    """Gated attention MIL over frozen tile embeddings.

    Args:
        in_dim: embedding width D.
        n_classes: number of classes.
        hidden_dim: width of the trainable tile projection.
        attention_dim: width of the attention gates.
        dropout: dropout after the projection and on the attention gates.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden_dim, attention_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.project(bag)
        a = self.attention(h)
        z = a @ h
        return self.classifier(z), a


@register_model("abmil")
def abmil(in_dim: int, n_classes: int, config: MILConfig) -> ABMIL:
    return ABMIL(in_dim, n_classes, config.hidden_dim, config.attention_dim, config.dropout)
