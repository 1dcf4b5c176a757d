"""What every recipe provides to the shared training loop."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from wsi_ssl.ssl.config import PretrainConfig
from wsi_ssl.ssl.schedules import Schedules

__all__ = ["Recipe", "StepOutput"]

StepOutput = tuple[Tensor, dict[str, Tensor]]


class Recipe(ABC):
    """A pretext task: its networks, its loss and the loss's own state.

    Students and teachers expose ``.backbone`` (the registry backbone, ``(B, 3, H, W) ->
    (B, D)``): that is what ``encoder.pt`` stores and :func:`wsi_ssl.ssl.load_encoder` loads.

    Attributes:
        name: the ``PretrainConfig.method`` value.
        needs_vit: the recipe masks patches, so ``check_arch`` refuses other backbones
            (``ArchitectureMismatchError``).
        uses_local_crops: the loss reads the local crops (their size is checked only then).
    """

    name = ""
    needs_vit = False
    uses_local_crops = True

    def __init__(self, config: PretrainConfig) -> None:
        self.config = config
        self.rank = 0  # this process's rank (masks differ per rank), set by the trainer

    @abstractmethod
    def build(self) -> tuple[nn.Module, nn.Module | None]:
        """A freshly initialised ``(student, teacher)``; the teacher starts as a copy."""

    @abstractmethod
    def loss(
        self,
        model: nn.Module,
        teacher: nn.Module | None,
        views: list[Tensor],
        step: int,
        schedules: Schedules,
        autocast: contextlib.AbstractContextManager[Any],
    ) -> StepOutput:
        """``(loss, parts)`` of one step on the crops ``views`` (2 global, then local);
        ``model`` is the student (DDP-wrapped under torchrun); parts are detached terms."""

    def to(self, device: torch.device) -> None:
        """Move the loss's own state (centres) to ``device``."""
        return None

    def loss_state(self) -> dict[str, Tensor]:
        """Tensors of the loss to checkpoint (e.g. the DINO centre)."""
        return {}

    def load_loss_state(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`loss_state`."""
        return None

    def last_layer(self, student: nn.Module) -> nn.Module | None:
        """The head layer frozen for ``freeze_last_layer_epochs`` (None: nothing to freeze)."""
        return None

    def compile(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """``torch.compile`` what is worth compiling."""
        return None


def copy_teacher(student: nn.Module, teacher: nn.Module) -> nn.Module:
    """``teacher`` with the student's weights and no gradients."""
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return teacher


def seeded_masks(seed: int) -> contextlib.AbstractContextManager[None]:
    """Seed ``random``, numpy and torch's CPU generator for a block (masks are drawn there,
    a function of the run seed and step, so a resumed run draws the same), then restore."""
    from wsi_ssl.ssl.dataset import seeded

    return seeded(seed)
