"""The DINO class-token loss, shared by :mod:`.dino` and :mod:`.dinov2`.

Both recipes compare the teacher's targets on the 2 global crops with the student's outputs on
every crop (global and local) except the same global crop: the mean over those (teacher crop,
student crop) pairs of ``-sum p_t log softmax(s / T_s)`` (DINO's ``DINOLoss`` and DINOv2's
``dino_clstoken_loss``). They differ only in how the teacher's targets are made: DINO centres
by a running mean (lightly's ``DINOLoss`` centre), DINOv2 by Sinkhorn-Knopp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["class_token_loss", "dino_cross_entropy"]


def dino_cross_entropy(
    teacher_probs: list[Tensor], student_out: list[Tensor], student_temp: float
) -> Tensor:
    """Mean over (teacher crop t, student crop s != t) of ``-sum p_t log softmax(s / T_s)``."""
    total = torch.zeros((), device=student_out[0].device)
    terms = 0
    for s_index, s in enumerate(student_out):
        log_p = F.log_softmax(s.float() / student_temp, dim=-1)
        for t_index, t in enumerate(teacher_probs):
            if t_index == s_index:
                continue
            total = total - (t * log_p).sum(dim=-1).mean()
            terms += 1
    return total / max(terms, 1)


def class_token_loss(
    teacher_probs: Tensor, student_out: Tensor, n_crops: int, student_temp: float
) -> Tensor:
    """The DINO loss of one step from crop-major outputs.

    Args:
        teacher_probs: ``(2 B, K)`` targets of the 2 global crops (rows sum to 1).
        student_out: ``(n_crops B, K)`` student outputs, the 2 global crops first.
        n_crops: crops per tile (2 global + the local ones).
        student_temp: the student's softmax temperature.
    """
    return dino_cross_entropy(
        list(teacher_probs.chunk(2)), list(student_out.float().chunk(n_crops)), student_temp
    )
