"""The interface every MIL model shares: ``forward(bag) -> (logits, attention or None)``."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["MILModel", "as_bag"]


def as_bag(bag: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """A float32 (N, D) tensor on ``device`` from a numpy array or tensor (float16 is cast)."""
    x = torch.from_numpy(np.ascontiguousarray(bag)) if isinstance(bag, np.ndarray) else bag
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise ValueError(f"a bag is (N, D) tile embeddings, got shape {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.float32)


class MILModel(nn.Module):
    """A slide classifier over a bag of tile embeddings.

    Subclasses implement ``forward(bag)`` for one bag ``(N, D)`` and return ``logits (C,)``
    and ``attention (N,)``: non-negative tile weights summing to 1, the weights the model
    pooled with, used for heatmaps and tile galleries (None for a model that weighs no tile
    above another, such as mean pooling).

    Attributes:
        in_dim: embedding width D the model takes.
        n_classes: number of classes C.
    """

    in_dim: int
    n_classes: int

    def forward(
        self, bag: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, bag: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities (C,) and attention (N,) or None for one bag, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            logits, attention = self(as_bag(bag, device))
        finally:
            self.train(was_training)
        probs = torch.softmax(logits.float(), dim=-1)
        weights = None if attention is None else attention.float().cpu().numpy()
        return probs.cpu().numpy(), weights
