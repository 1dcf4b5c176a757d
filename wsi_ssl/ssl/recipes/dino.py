"""DINO (Caron et al., 2021, https://arxiv.org/abs/2104.14294, Algorithm 1).

The teacher sees the 2 global crops, the student all ``2 + n_local`` crops; the teacher output
is centred by lightly's ``DINOLoss`` centre and sharpened at the teacher temperature, the
class-token loss (:func:`~wsi_ssl.ssl.recipes.class_token.class_token_loss`, shared with
DINOv2) compares every teacher crop with every other student crop, and the centre is updated
(lightly's ``update_center``, averaged over all processes under DDP).
The networks are :class:`~wsi_ssl.ssl.models.MultiCropModel` (backbone + DINO head).
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss
from torch import Tensor, nn

from wsi_ssl.ssl.methods import RECIPES
from wsi_ssl.ssl.models import MultiCropModel, build_dino
from wsi_ssl.ssl.recipes.base import Recipe, StepOutput
from wsi_ssl.ssl.recipes.class_token import class_token_loss
from wsi_ssl.ssl.schedules import Schedules

__all__ = ["DINORecipe"]


@RECIPES.register("dino")
class DINORecipe(Recipe):
    name = "dino"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        c = config
        self.criterion = DINOLoss(
            output_dim=c.out_dim,
            warmup_teacher_temp=c.warmup_teacher_temp,
            teacher_temp=c.teacher_temp,
            warmup_teacher_temp_epochs=0,
            student_temp=c.student_temp,
            center_momentum=c.center_momentum,
        )

    def build(self) -> tuple[nn.Module, nn.Module | None]:
        return build_dino(self.config)

    def to(self, device: torch.device) -> None:
        self.criterion.to(device)

    def loss(
        self,
        model: nn.Module,
        teacher: nn.Module | None,
        views: list[Tensor],
        step: int,
        schedules: Schedules,
        autocast: contextlib.AbstractContextManager[Any],
    ) -> StepOutput:
        assert teacher is not None
        with autocast:
            with torch.no_grad():
                teacher_out = teacher(views[:2])
            student_out = model(views)
        loss = self.class_token_step(
            teacher_out, student_out, len(views), schedules.teacher_temperature(step)
        )
        return loss, {"dino_loss": loss.detach()}

    def class_token_step(
        self, teacher_out: Tensor, student_out: Tensor, n_crops: int, teacher_temp: float
    ) -> Tensor:
        """The loss of crop-major outputs ``(2 B, K)`` and ``(n_crops B, K)``: the teacher
        centred and sharpened, the shared class-token loss, then the centre updated."""
        teacher = teacher_out.detach().float()
        center = self.criterion.center.view(1, -1)
        probs = F.softmax((teacher - center) / teacher_temp, dim=-1)
        loss = class_token_loss(probs, student_out, n_crops, self.config.student_temp)
        self.criterion.update_center(torch.stack(teacher.chunk(2)))
        return loss

    def loss_state(self) -> dict[str, Tensor]:
        return {"center": self.criterion.center.detach().cpu()}

    def load_loss_state(self, state: dict[str, Tensor]) -> None:
        self.criterion.center.copy_(state["center"].to(self.criterion.center.device))

    def last_layer(self, student: nn.Module) -> nn.Module | None:
        # a submodule of the DINO head; nn.Module types attributes as Tensor | Module
        return cast(nn.Module, cast(MultiCropModel, student).head.last_layer)

    def compile(self, student: nn.Module, teacher: nn.Module | None) -> None:
        cast(MultiCropModel, student).compile_backbone()
        if teacher is not None:
            cast(MultiCropModel, teacher).compile_backbone()
