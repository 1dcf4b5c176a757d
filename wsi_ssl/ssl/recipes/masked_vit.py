"""A ViT backbone that takes patch masks: lightly's ``MaskedVisionTransformerTIMM`` over the
registry's timm ``VisionTransformer``, plus a learnt mask token.

:class:`MaskedViT` keeps the plain backbone as ``.backbone`` (so checkpoints and
``encoder.pt`` hold the same keys as a DINO run) and ``mask_token``; lightly's wrapper is
built around them without re-initialising anything (``weight_initialization="skip"``,
``pos_embed_initialization="skip"``) and is not a registered submodule, so each parameter has
one name.
"""

from __future__ import annotations

from typing import Any

import torch
from lightly.models.modules import MaskedVisionTransformerTIMM
from torch import Tensor, nn

from wsi_ssl.errors import ArchitectureMismatchError

__all__ = ["MaskedViT", "require_vit"]


def require_vit(backbone: nn.Module, method: str, arch: str) -> Any:
    """``backbone`` if it is a timm ``VisionTransformer``; ``ArchitectureMismatchError`` else."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(backbone, VisionTransformer):
        raise ArchitectureMismatchError(
            f"method {method!r} masks image patches and needs a timm ViT backbone, but arch "
            f"{arch!r} builds a {type(backbone).__name__}; choose a ViT arch or init, or "
            "method='dino'"
        )
    return backbone


class MaskedViT(nn.Module):
    """``backbone`` (timm ViT) + ``mask_token``; :meth:`tokens` runs it with a patch mask."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        vit: Any = backbone
        self.mask_token = nn.Parameter(torch.zeros(1, 1, int(vit.embed_dim)))
        object.__setattr__(
            self,
            "_masked",
            MaskedVisionTransformerTIMM(
                vit=backbone,  # type: ignore[arg-type]
                mask_token=self.mask_token,
                weight_initialization="skip",
                pos_embed_initialization="skip",
            ),
        )
        masked: Any = self._masked
        self._encode: Any = masked.encode

    @property
    def prefix_tokens(self) -> int:
        vit: Any = self.backbone
        return int(vit.num_prefix_tokens)

    @property
    def patch_size(self) -> int:
        vit: Any = self.backbone
        return int(vit.patch_embed.patch_size[0])

    def compile_encoder(self, **kwargs: Any) -> None:
        masked: Any = self._masked
        self._encode = torch.compile(masked.encode, **kwargs)

    def tokens(
        self, images: Tensor, mask: Tensor | None = None, idx_keep: Tensor | None = None
    ) -> Tensor:
        """``(B, T, D)`` normalised output tokens, prefix tokens first.

        Args:
            mask: ``(B, h, w)`` bool, True where a patch is replaced by the mask token.
            idx_keep: ``(B, k)`` token indices (prefix tokens included) to keep (MAE).
        """
        full = None
        if mask is not None:
            prefix = mask.new_zeros(mask.shape[0], self.prefix_tokens)
            full = torch.cat([prefix, mask.flatten(1)], dim=1)
        out: Tensor = self._encode(images, mask=full, idx_keep=idx_keep)
        return out
