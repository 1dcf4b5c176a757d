"""MAE on a ViT with register tokens (UNI2-h has 8, Virchow2 4): every prefix token kept, the
patches alone masked and predicted. MAE refused such ViTs ("needs a ViT with one class token
and no register tokens"), so continued pretraining from those presets could not use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightly.models import utils
from torch import nn

import wsi_ssl
from wsi_ssl.ssl import PretrainConfig, load_encoder, pretrain
from wsi_ssl.ssl.backbones import BACKBONES, BackboneSpec, register_backbone
from wsi_ssl.ssl.recipes.mae import patch_masks

ARCH = "test_vit_registers"  # 4 register tokens, positions on the patches only (as UNI2-h)
if ARCH not in BACKBONES.names():

    @register_backbone(BackboneSpec(ARCH, "vit", 64, 8, 32, False, "test ViT with registers"))
    def _vit_with_registers(*, drop_path_rate: float, input_size: int) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=input_size,
            patch_size=8,
            embed_dim=64,
            depth=2,
            num_heads=2,
            num_classes=0,
            reg_tokens=4,
            no_embed_class=True,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
        )


def test_the_masks_keep_every_prefix_token_and_mask_patches_only() -> None:
    torch.manual_seed(3)
    keep, mask = patch_masks(3, 16, 5, 0.75)
    assert keep.shape == (3, 5 + 4) and mask.shape == (3, 12)
    assert (keep[:, :5] == torch.arange(5)).all()
    assert (keep[:, 5:] >= 5).all() and (mask >= 5).all()
    for row in range(3):
        assert sorted([*keep[row].tolist(), *mask[row].tolist()]) == list(range(21))
    # one class token: lightly's own masks, so runs from before draw the same ones
    torch.manual_seed(3)
    ours = patch_masks(3, 16, 1, 0.75)
    torch.manual_seed(3)
    theirs = utils.random_token_mask((3, 17), mask_ratio=0.75)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.fixture(scope="module")
def tiles(cmu_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cmu64")
    wsi_ssl.tile_slide(cmu_small, root, wsi_ssl.TilingConfig(tile_size=64, tiles_per_chunk=32))
    return root


def test_mae_trains_a_vit_with_register_tokens(tiles: Path, tmp_path: Path) -> None:
    config = PretrainConfig.preset(
        "cpu-small",
        method="mae",
        arch=ARCH,
        global_crop_size=32,
        local_crop_size=16,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
        batch_size=8,
        steps=8,
        base_lr=0.005,
        device="cpu",
        num_workers=0,
        num_threads=1,
        progress=False,
        log_every=2,
        checkpoint_every=4,
    )
    run = pretrain(tiles, config, out=tmp_path / "run")
    losses = [row["mae_loss"] for row in run.history]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    encoder = load_encoder(run.out_dir)
    features = encoder.embed(np.full((2, 64, 64, 3), 200, np.uint8))
    assert features.shape == (2, 64) and np.isfinite(features).all()
