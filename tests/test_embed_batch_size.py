"""The default batch size: 256 on the CPU; on CUDA the largest power of two that fits the free
device memory by a measured probe (the rule runs here, the probe on the GPU machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wsi_ssl.config import TilingConfig
from wsi_ssl.embedding import EmbedConfig, embed
from wsi_ssl.embedding.batch_size import (
    CPU_BATCH_SIZE,
    MAX_BATCH,
    MEMORY_FRACTION,
    MIN_BATCH,
    auto_batch_size,
    batch_for_memory,
)
from wsi_ssl.encoders import create_encoder
from wsi_ssl.storage import open_store
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide

GiB, MiB = 2**30, 2**20


def test_the_rule_takes_the_largest_power_of_two_within_the_memory_budget() -> None:
    # 80 GiB free, 50 MiB a tile: 0.7 * 80 GiB holds 1146 tiles -> 1024
    assert batch_for_memory(80 * GiB, 50 * MiB) == 1024
    assert 1024 * 50 * MiB <= MEMORY_FRACTION * 80 * GiB < 2048 * 50 * MiB
    assert batch_for_memory(1 * GiB, 900 * MiB) == MIN_BATCH  # never below the minimum
    assert batch_for_memory(140 * GiB, 1 * MiB) == MAX_BATCH  # nor above the maximum
    assert batch_for_memory(8 * GiB, 0.0) == MAX_BATCH


def test_cpu_keeps_256_and_the_size_used_is_recorded(tmp_path: Path) -> None:
    assert EmbedConfig().batch_size is None
    assert auto_batch_size(create_encoder("random-cnn", device="cpu")) == CPU_BATCH_SIZE == 256
    slide = write_synthetic_slide(tmp_path / "s.tiff", (500, 500), seed=4)
    config = TilingConfig(tile_size=224, codec="zstd", tissue_threshold=0.0)
    tile_slide(slide, tmp_path / "root", config)
    summary = embed(tmp_path / "root", "random-cnn", device="cpu", workers=0)
    assert not summary.failed and summary.config["batch_size"] == 256
    [sid] = open_store(tmp_path / "root").slide_ids
    array = open_store(tmp_path / "root").embeddings(sid, summary.encoder_id)
    assert array.attrs["embed"]["batch_size"] == 256


@pytest.mark.gpu
def test_the_cuda_probe_picks_a_batch_that_runs_and_fits() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    enc = create_encoder("random-vit-small", device="cuda")
    batch = auto_batch_size(enc)
    assert MIN_BATCH <= batch <= MAX_BATCH and batch & (batch - 1) == 0
    free, _ = torch.cuda.mem_get_info()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    x = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device="cuda")
    with torch.inference_mode():
        out = enc(x)
    assert out.shape == (batch, enc.embed_dim) and torch.isfinite(out).all()
    assert torch.cuda.max_memory_allocated() - before <= free
