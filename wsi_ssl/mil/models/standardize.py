"""Per-dimension standardisation of tile embeddings in front of a MIL model.

Encoders differ in the scale of their embeddings by orders of magnitude (a random-init CNN
gives values around 1e-2, some foundation models 1e1), and per dimension as much; a MIL head
trained at one learning rate on raw vectors then learns at very different speeds. The mean and
standard deviation of every dimension over the training tiles are computed once per fold and
kept as buffers, so the checkpoint applies them itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from numpy.typing import ArrayLike

from wsi_ssl.mil.models.base import MILModel

__all__ = ["Standardized", "feature_stats"]


def feature_stats(bags: Iterable[ArrayLike]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (D,) over every tile of an iterable of (N, D) bags."""
    total = squares = None
    n = 0
    for bag in bags:
        x = np.asarray(bag, dtype=np.float64)
        total = x.sum(axis=0) if total is None else total + x.sum(axis=0)
        squares = (x * x).sum(axis=0) if squares is None else squares + (x * x).sum(axis=0)
        n += len(x)
    if total is None or squares is None or n == 0:
        raise ValueError("feature_stats: no tiles")
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    return mean.astype(np.float32), std.astype(np.float32)


class Standardized(MILModel):
    """``inner((bag - mean) / std)``: wraps any MIL model; same ``forward`` interface.

    Args:
        inner: the MIL model.
        mean: per-dimension mean (D,), or None for zeros (set later from data).
        std: per-dimension standard deviation (D,), floored at ``eps``.
        eps: the floor, so that constant dimensions stay 0.
    """

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(
        self,
        inner: MILModel,
        mean: np.ndarray | None = None,
        std: np.ndarray | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.in_dim = inner.in_dim
        self.n_classes = inner.n_classes
        self.eps = eps
        self.register_buffer("mean", torch.zeros(inner.in_dim))
        self.register_buffer("std", torch.ones(inner.in_dim))
        if mean is not None and std is not None:
            self.set_stats(mean, std)

    def set_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(self.eps))

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.inner((bag - self.mean) / self.std)
