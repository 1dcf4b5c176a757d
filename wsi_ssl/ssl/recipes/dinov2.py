"""DINOv2 (Oquab et al., 2023, https://arxiv.org/abs/2304.07193): DINO on the class token plus
the iBOT masked-patch loss (Zhou et al., 2022, https://arxiv.org/abs/2111.07832) plus the KoLeo
regulariser (Sablayrolles et al., 2019, https://arxiv.org/abs/1806.03198), with the teacher
centred by Sinkhorn-Knopp (Caron et al., 2020, SwAV) instead of a running mean.

One step, as in DINOv2's ``ssl_meta_arch.py`` (one head shared by both losses, its default):

1. block masks for half of the global crops (``mask_probability``), each masking a fraction
   in ``mask_ratio`` of its patches (lightly's ``random_block_mask``, DINOv2's generator);
2. the teacher sees the unmasked global crops: class tokens and the patch tokens at the
   masked positions go through its head, and Sinkhorn-Knopp (3 iterations) turns them into
   targets at the teacher temperature;
3. the student sees the masked global crops and the local crops; the DINO loss is the mean
   cross-entropy between each teacher global crop and every other student crop, the iBOT
   loss the cross-entropy at the masked patches, weighted ``1 / masked patches`` per image
   and averaged over images, and KoLeo ``-mean log(nearest-neighbour distance)`` of the
   student's l2-normalised backbone class tokens, per global crop;
4. ``loss = dino + ibot_loss_weight * ibot + koleo_loss_weight * koleo``.

Blocks: lightly's ``MaskedVisionTransformerTIMM``, ``DINOv2ProjectionHead``, ``KoLeoLoss``,
``sinkhorn`` and ``random_block_mask``.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, cast

import torch
import torch.nn.functional as F
from lightly.loss import KoLeoLoss
from lightly.loss.msn_loss import sinkhorn
from lightly.models.modules import DINOv2ProjectionHead
from lightly.models.utils import random_block_mask
from torch import Tensor, nn

from wsi_ssl.ssl.backbones import build_backbone, get_spec
from wsi_ssl.ssl.config import PretrainConfig
from wsi_ssl.ssl.methods import RECIPES
from wsi_ssl.ssl.recipes.base import Recipe, StepOutput, copy_teacher, seeded_masks
from wsi_ssl.ssl.recipes.class_token import class_token_loss
from wsi_ssl.ssl.recipes.masked_vit import MaskedViT, require_vit
from wsi_ssl.ssl.schedules import Schedules

__all__ = [
    "DINOv2Model",
    "DINOv2Recipe",
    "ibot_cross_entropy",
    "sinkhorn_knopp",
]


@torch.no_grad()
def sinkhorn_knopp(teacher_output: Tensor, temperature: float, iterations: int = 3) -> Tensor:
    """Teacher targets ``(N, K)``: DINOv2's ``sinkhorn_knopp_teacher`` (rows sum to 1).

    ``exp(t / temperature)`` is normalised alternately over prototypes and samples (lightly's
    ``sinkhorn``, which sums over all processes under DDP); the global shift by the maximum
    only guards against overflow (the first normalisation removes it).
    """
    logits = teacher_output.float() / temperature
    return sinkhorn(torch.exp(logits - logits.max()), iterations, gather_distributed=True)


def ibot_cross_entropy(
    teacher_probs: Tensor, student_out: Tensor, masks: Tensor, student_temp: float
) -> Tensor:
    """iBOT patch loss: ``(M, K)`` targets and outputs at the ``M`` masked patches of
    ``masks`` ``(B, h, w)``; each image's patches weigh ``1 / its masked count``, averaged
    over all ``B`` images (DINOv2's ``forward_masked``)."""
    if teacher_probs.shape[0] == 0:
        return student_out.sum() * 0.0
    loss = -(teacher_probs * F.log_softmax(student_out.float() / student_temp, dim=-1)).sum(-1)
    per_image = masks.flatten(1).sum(dim=1, keepdim=True).clamp(min=1)
    weight = (1.0 / per_image).expand_as(masks.flatten(1))[masks.flatten(1)]
    return (loss * weight).sum() / masks.shape[0]


class DINOv2Model(nn.Module):
    """A masked ViT and the shared DINO/iBOT head.

    ``forward(global_crops, local_crops, masks)`` returns the head outputs of the global class
    tokens ``(G, K)``, of the local class tokens ``(L, K)`` (empty without local crops), of the
    patch tokens at ``masks`` ``(M, K)``, and the global class tokens before the head
    ``(G, D)`` (for KoLeo). The student passes ``masks`` into the ViT (mask tokens); the teacher
    (``apply_mask=False``) sees the crops whole and only reads those positions.
    """

    def __init__(self, encoder: MaskedViT, head: nn.Module, apply_mask: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.apply_mask = apply_mask

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def forward(
        self, global_crops: Tensor, local_crops: Tensor | None, masks: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        prefix = self.encoder.prefix_tokens
        tokens = self.encoder.tokens(global_crops, mask=masks if self.apply_mask else None)
        cls = tokens[:, 0]
        patches = tokens[:, prefix:].flatten(0, 1)[masks.flatten()]
        n_global, n_patch = len(cls), len(patches)
        parts = [cls, patches]
        if local_crops is not None:
            parts.append(self.encoder.tokens(local_crops)[:, 0])
        out = self.head(torch.cat(parts))
        return out[:n_global], out[n_global + n_patch :], out[n_global : n_global + n_patch], cls


@RECIPES.register("dinov2")
class DINOv2Recipe(Recipe):
    name = "dinov2"
    needs_vit = True

    def __init__(self, config: PretrainConfig) -> None:
        super().__init__(config)
        self.koleo = KoLeoLoss()

    def build(self) -> tuple[nn.Module, nn.Module | None]:
        c = self.config
        spec = get_spec(c.arch)

        def model(drop_path_rate: float, apply_mask: bool) -> DINOv2Model:
            backbone = build_backbone(
                c.arch, drop_path_rate=drop_path_rate, input_size=c.global_crop_size
            )
            require_vit(backbone, c.method, c.arch)
            with warnings.catch_warnings():  # lightly's weight_norm (see models.build_head)
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*weight_norm")
                head = DINOv2ProjectionHead(
                    input_dim=spec.embed_dim,
                    hidden_dim=c.hidden_dim,
                    bottleneck_dim=c.bottleneck_dim,
                    output_dim=c.out_dim,
                )
            return DINOv2Model(MaskedViT(backbone), head, apply_mask)

        student = model(c.drop_path_rate, True)
        return student, copy_teacher(student, model(0.0, False))

    def masks(self, n: int, grid: int, step: int) -> Tensor:
        """Block masks ``(n, grid, grid)`` of the global crops of ``step`` (on the CPU)."""
        from wsi_ssl.ssl.sampler import mix_seed

        c = self.config
        with seeded_masks(mix_seed(c.seed, step, self.rank, 0xB10C)):
            return random_block_mask(
                (n, grid, grid),
                batch_mask_ratio=c.mask_probability,
                min_image_mask_ratio=c.mask_ratio[0],
                max_image_mask_ratio=c.mask_ratio[1],
                # DINOv2's MaskingGenerator: blocks of 4 .. half the patches
                min_num_masks_per_block=4,
                max_num_masks_per_block=max(4, grid * grid // 2),
            )

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
        c = self.config
        globals_ = torch.cat(views[:2])
        locals_ = torch.cat(views[2:]) if len(views) > 2 else None
        grid = globals_.shape[-1] // cast(DINOv2Model, teacher).encoder.patch_size
        masks = self.masks(len(globals_), grid, step).to(globals_.device)
        temp = schedules.teacher_temperature(step)
        with autocast:
            with torch.no_grad():
                t_cls, _, t_patch, _ = teacher(globals_, None, masks)
            s_cls, s_local, s_patch, s_tokens = model(globals_, locals_, masks)
        t_cls_probs = sinkhorn_knopp(t_cls, temp, c.sinkhorn_iterations)
        t_patch_probs = sinkhorn_knopp(t_patch, temp, c.sinkhorn_iterations)
        dino = class_token_loss(
            t_cls_probs, torch.cat([s_cls, s_local]), len(views), c.student_temp
        )
        ibot = ibot_cross_entropy(t_patch_probs, s_patch, masks, c.student_temp)
        koleo = sum(self.koleo(t.float()) for t in s_tokens.chunk(2))
        koleo = cast(Tensor, koleo)
        loss = dino + c.ibot_loss_weight * ibot + c.koleo_loss_weight * koleo
        parts = {"dino_loss": dino.detach(), "ibot_loss": ibot.detach(), "koleo": koleo.detach()}
        return loss, parts

    def last_layer(self, student: nn.Module) -> nn.Module | None:
        return cast(nn.Module, cast(DINOv2Model, student).head.last_layer)

    def compile(self, student: nn.Module, teacher: nn.Module | None) -> None:
        cast(DINOv2Model, student).encoder.compile_encoder()
        if teacher is not None:
            cast(DINOv2Model, teacher).encoder.compile_encoder()
