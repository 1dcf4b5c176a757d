"""What an encoder preset built with random weights is described as, and records."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from wsi_ssl.config import TilingConfig
from wsi_ssl.embedding import EmbedConfig, embed
from wsi_ssl.encoders import create_encoder
from wsi_ssl.storage import SlideStore, open_store
from wsi_ssl.storage.embeddings import open_embeddings_array
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide

FAST = EmbedConfig(batch_size=4, device="cpu", workers=0)
TILING = replace(TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=4), tissue_threshold=0)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """One small synthetic slide tiled at 224 px, every grid tile kept (4 tiles)."""
    slide = write_synthetic_slide(tmp_path / "s.tiff", (448, 448), seed=1)
    tile_slide(slide, tmp_path / "root", TILING)
    return tmp_path / "root"


def _store(root: Path) -> SlideStore:
    archive = open_store(root)
    [sid] = archive.slide_ids
    return archive.slide(sid)


def test_a_preset_with_random_weights_is_described_as_random(root: Path, tmp_path: Path) -> None:
    """resnet18 built with weights="random" was described, and recorded with its vectors, as
    "(weights: local file)"; a zoo preset as reading its published file."""
    enc = create_encoder("resnet18", weights="random")
    assert enc.config.source == "random"
    want = "torchvision ResNet-18, pooled 512-d (weights: seeded random init)"
    assert enc.config.description == want
    summary = embed(root, enc, FAST)
    assert summary.encoder["description"] == want
    attrs = open_embeddings_array(_store(root).path, enc.encoder_id).attrs
    assert attrs["encoder"]["description"] == want
    # the same architecture from a file still says so (and keeps its id's name)
    path = tmp_path / "resnet18.pth"
    torch.save(enc.model.state_dict(), path)
    loaded = create_encoder("resnet18", weights=path)
    assert loaded.config.description == "torchvision ResNet-18, pooled 512-d (weights: local file)"
    zoo = create_encoder("phikon", weights="random")
    assert zoo.config.description == (
        "Phikon ViT-B/16 (transformers ViTModel layout) 768-d (weights: seeded random init)"
    )
    # an encoder that is a random init by name is not told so twice
    cnn = create_encoder("random-cnn")
    assert cnn.config.description == "small random-init CNN (tests; fast on CPU)"


def test_a_description_that_says_random_of_a_file_encoder_is_still_told() -> None:
    """Whether the encoder is random by registration decides, not the word in its text: one
    described as trained "with randomized stain augmentation" lost its weights note and read
    as pretrained."""
    from wsi_ssl.encoders import register_encoder
    from wsi_ssl.encoders._builtin import SmallCNN
    from wsi_ssl.encoders.registry import ENCODERS

    name = "test-randomized-aug-cnn"
    if name not in ENCODERS.names():
        register_encoder(
            name,
            arch="builtin/small_cnn",
            input_size=224,
            embed_dim=64,
            description="CNN pretrained with randomized stain augmentation (weights: local file)",
        )(lambda config: SmallCNN())
    enc = create_encoder(name, weights="random")
    assert enc.config.description == (
        "CNN pretrained with randomized stain augmentation (weights: seeded random init)"
    )
