"""Mean-pooling MIL baseline: the slide is the average of its projected tile embeddings.

The permutation-invariant "mean" pooling operator that Ilse et al. (ICML 2018) compare
attention pooling against; every tile weighs ``1/N``, so a few informative tiles among many
are diluted, which is what attention pooling fixes. It weighs no tile above another, so it
returns no attention (no heatmaps or galleries are drawn for it).
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_ssl.mil.config import MILConfig
from wsi_ssl.mil.models.base import MILModel
from wsi_ssl.mil.models.registry import register_model

__all__ = ["MeanPoolMIL"]


class MeanPoolMIL(MILModel):
    """Project tiles (Linear, ReLU, dropout), average them, classify; no attention.

    Args:
        in_dim: embedding width D.
        n_classes: number of classes.
        hidden_dim: width of the trainable tile projection.
        dropout: dropout after the projection.
    """

    def __init__(
        self, in_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.25
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.classifier(self.project(bag).mean(dim=0)), None


@register_model("meanpool")
def meanpool(in_dim: int, n_classes: int, config: MILConfig) -> MeanPoolMIL:
    return MeanPoolMIL(in_dim, n_classes, config.hidden_dim, config.dropout)
