"""Masked autoencoding (He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners",
https://arxiv.org/abs/2111.06377): the generative pretext, to compare with the discriminative
DINO family on the same tiles.

Each global crop hides a random ``mae_mask_ratio`` of its patches (lightly's
``random_token_mask``; the class and any register tokens are always kept, :func:`patch_masks`);
the ViT encodes the visible ones, a linear layer narrows them to
``decoder_dim``, lightly's ``MaskedVisionTransformerDecoderTIMM`` (``decoder_depth`` blocks,
fixed sine-cosine positions) fills the rest with its mask token, and a linear layer predicts
the pixels of the masked patches. The
loss is the mean squared error over the masked patches only; with ``mae_norm_pix`` each target
patch is first normalised by its own mean and variance (the paper's better variant). There is
no teacher: the encoder is the student's backbone. The local crops are not used.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import torch
from lightly.models import utils
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM
from torch import Tensor, nn

from wsi_ssl.ssl.backbones import build_backbone
from wsi_ssl.ssl.config import PretrainConfig
from wsi_ssl.ssl.methods import RECIPES
from wsi_ssl.ssl.recipes.base import Recipe, StepOutput, seeded_masks
from wsi_ssl.ssl.recipes.masked_vit import MaskedViT, require_vit
from wsi_ssl.ssl.schedules import Schedules

__all__ = ["MAEModel", "MAERecipe", "mae_loss", "patch_masks"]


def mae_loss(pred: Tensor, target: Tensor, norm_pix: bool) -> Tensor:
    """Mean squared error of ``(B, M, P)`` predicted and target pixels of the masked patches;
    ``norm_pix``: targets normalised per patch, ``(t - mean) / sqrt(var + 1e-6)``."""
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return ((pred.float() - target) ** 2).mean()


class MAEModel(nn.Module):
    """ViT encoder + MAE decoder: ``forward(images, idx_keep, idx_mask) -> (pred, target)``
    pixels of the masked patches, ``(B, M, patch_size**2 * 3)`` each."""

    def __init__(
        self, encoder: MaskedViT, decoder: MaskedVisionTransformerDecoderTIMM, decoder_dim: int
    ) -> None:
        super().__init__()
        self.encoder = encoder
        vit: Any = encoder.backbone
        self.decoder_embed = nn.Linear(int(vit.embed_dim), decoder_dim)
        self.decoder = decoder
        self.decoder_pred = nn.Linear(decoder_dim, encoder.patch_size**2 * 3)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def forward(self, images: Tensor, idx_keep: Tensor, idx_mask: Tensor) -> tuple[Tensor, Tensor]:
        prefix = self.encoder.prefix_tokens
        embedded = self.decoder_embed(self.encoder.tokens(images, idx_keep=idx_keep))
        length = prefix + (images.shape[-1] // self.encoder.patch_size) ** 2
        mask_token = cast(Tensor, self.decoder.mask_token)
        tokens = utils.repeat_token(mask_token, (images.shape[0], length))
        tokens = utils.set_at_index(tokens, idx_keep, embedded.type_as(tokens))
        decoded = self.decoder(tokens)
        pred = self.decoder_pred(utils.get_at_index(decoded, idx_mask))
        patches = utils.patchify(images, self.encoder.patch_size)
        return pred, utils.get_at_index(patches, idx_mask - prefix)


@RECIPES.register("mae")
class MAERecipe(Recipe):
    name = "mae"
    needs_vit = True
    uses_local_crops = False

    def __init__(self, config: PretrainConfig) -> None:
        super().__init__(config)

    def build(self) -> tuple[nn.Module, nn.Module | None]:
        c = self.config
        backbone = build_backbone(
            c.arch, drop_path_rate=c.drop_path_rate, input_size=c.global_crop_size
        )
        require_vit(backbone, c.method, c.arch)
        encoder = MaskedViT(backbone)
        decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=(c.global_crop_size // encoder.patch_size) ** 2,
            embed_dim=c.decoder_dim,
            depth=c.decoder_depth,
            num_heads=c.decoder_heads,
            num_prefix_tokens=encoder.prefix_tokens,
        )
        return MAEModel(encoder, decoder, c.decoder_dim), None

    def loss(
        self,
        model: nn.Module,
        teacher: nn.Module | None,
        views: list[Tensor],
        step: int,
        schedules: Schedules,
        autocast: contextlib.AbstractContextManager[Any],
    ) -> StepOutput:
        from wsi_ssl.ssl.sampler import mix_seed

        c = self.config
        images = torch.cat(views[:2])
        encoder = _inner(model).encoder
        n_patches = (images.shape[-1] // encoder.patch_size) ** 2
        with seeded_masks(mix_seed(c.seed, step, self.rank, 0x3AE)):
            idx_keep, idx_mask = patch_masks(
                len(images), n_patches, encoder.prefix_tokens, c.mae_mask_ratio
            )
        with autocast:
            pred, target = model(images, idx_keep.to(images.device), idx_mask.to(images.device))
        loss = mae_loss(pred, target, c.mae_norm_pix)
        return loss, {"mae_loss": loss.detach()}

    def compile(self, student: nn.Module, teacher: nn.Module | None) -> None:
        cast(MAEModel, student).encoder.compile_encoder()


def patch_masks(
    batch: int, n_patches: int, prefix: int, mask_ratio: float
) -> tuple[Tensor, Tensor]:
    """MAE's ``(idx_keep, idx_mask)`` token indices: every prefix token (class, then register
    tokens) kept, ``mask_ratio`` of the patches masked. The patches are drawn as lightly's
    ``random_token_mask`` draws them behind one class token; register tokens shift them."""
    idx_keep, idx_mask = utils.random_token_mask((batch, 1 + n_patches), mask_ratio=mask_ratio)
    if prefix == 1:
        return idx_keep, idx_mask
    registers = torch.arange(1, prefix).expand(batch, -1)  # idx_keep[:, 0] is the class token
    shift = prefix - 1
    return torch.cat([idx_keep[:, :1], registers, idx_keep[:, 1:] + shift], 1), idx_mask + shift


def _inner(model: nn.Module) -> MAEModel:
    return cast(MAEModel, model.module if hasattr(model, "module") else model)  # DDP
