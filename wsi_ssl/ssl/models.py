"""The DINO student and teacher: a registered backbone plus lightly's ``DINOProjectionHead``.

DINO (Caron et al., 2021, https://arxiv.org/abs/2104.14294) trains a student network to match
the output distribution of a teacher that is an exponential moving average of the student.
:class:`MultiCropModel` is the network both use: like the paper's ``MultiCropWrapper`` it takes
the list of crops of a batch, runs the backbone once per run of equal-resolution crops (the
2 global crops together, then the local crops), and the head once on all features, so a
multi-GPU ``DistributedDataParallel`` sees a single forward per step.

The teacher is built like the student but without stochastic depth and starts from the
student's weights; it never receives gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightly.models.modules import DINOProjectionHead
from torch import Tensor, nn

from wsi_ssl.ssl.backbones import build_backbone, get_spec
from wsi_ssl.ssl.config import PretrainConfig

__all__ = ["MultiCropModel", "build_dino", "build_head"]


class MultiCropModel(nn.Module):
    """``backbone`` + ``head`` over the crops of a multi-crop batch.

    Args:
        backbone: ``(B, 3, H, W) -> (B, D)``.
        head: ``(B, D) -> (B, K)``.

    ``forward(crops)`` takes a list of ``(B, 3, H_i, W_i)`` tensors and returns
    ``(len(crops) * B, K)``, crop-major (all of crop 0, then all of crop 1, ...).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        # A compiled callable of the same backbone, stored outside the module tree so that
        # state dicts keep their plain keys (set by :meth:`compile_backbone`).
        self._backbone_fn: Callable[[Tensor], Tensor] | None = None

    def compile_backbone(self, **kwargs: Any) -> None:
        """Run the backbone through ``torch.compile`` (one graph per crop resolution)."""
        object.__setattr__(self, "_backbone_fn", torch.compile(self.backbone, **kwargs))

    def forward(self, crops: Sequence[Tensor] | Tensor) -> Tensor:
        if isinstance(crops, Tensor):
            crops = [crops]
        run = self._backbone_fn or self.backbone
        features = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(run(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(features))


def build_head(config: PretrainConfig, input_dim: int) -> DINOProjectionHead:
    """lightly's DINO head: 3-layer MLP, l2-normalised bottleneck, weight-normalised output."""
    with warnings.catch_warnings():
        # lightly uses torch.nn.utils.weight_norm, deprecated in favour of the
        # parametrization; the state-dict keys (weight_g, weight_v) depend on it.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*weight_norm.*")
        return DINOProjectionHead(
            input_dim=input_dim,
            hidden_dim=config.hidden_dim,
            bottleneck_dim=config.bottleneck_dim,
            output_dim=config.out_dim,
            batch_norm=config.head_batch_norm,
            norm_last_layer=config.norm_last_layer,
        )


def build_dino(config: PretrainConfig) -> tuple[MultiCropModel, MultiCropModel]:
    """A freshly initialised ``(student, teacher)`` pair; the teacher is a copy of the student.

    Initialisation draws from torch's global generator: seed it first for a reproducible run.
    """
    spec = get_spec(config.arch)
    student = MultiCropModel(
        build_backbone(
            config.arch, drop_path_rate=config.drop_path_rate, input_size=config.global_crop_size
        ),
        build_head(config, spec.embed_dim),
    )
    teacher = MultiCropModel(
        build_backbone(config.arch, drop_path_rate=0.0, input_size=config.global_crop_size),
        build_head(config, spec.embed_dim),
    )
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher
