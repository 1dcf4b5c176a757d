"""The default batch size: 256 on the CPU; on CUDA the largest power of two that fits the free
device memory by a measured probe (the rule runs here, the probe on the GPU machine), and a
probe that itself runs out of memory is a typed error naming ``batch_size``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from wsi_ssl.cli.hints import command_parser, in_command_words
from wsi_ssl.cli.main import build_parser
from wsi_ssl.config import TilingConfig
from wsi_ssl.embedding import EmbedConfig, embed
from wsi_ssl.embedding.batch_size import (
    CPU_BATCH_SIZE,
    MAX_BATCH,
    MEMORY_FRACTION,
    MIN_BATCH,
    auto_batch_size,
    batch_for_memory,
    probe_forward,
)
from wsi_ssl.encoders import Encoder, create_encoder
from wsi_ssl.errors import DeviceOutOfMemoryError
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
    slide = write_synthetic_slide(tmp_path / "s.tiff", (1000, 1000), seed=4)
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


class RoomFor(nn.Module):
    """A real encoder module (a linear head over the mean colour) on a device with room for
    ``capacity`` tiles: a larger batch raises the error CUDA's allocator raises."""

    def __init__(self, capacity: int, dim: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.head = nn.Linear(3, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.capacity:
            need = x.shape[0] * x[0].numel() * x.element_size()
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {need} bytes.")
        return self.head(x.mean(dim=(2, 3)))


def test_a_probe_out_of_memory_is_a_typed_error_naming_batch_size(tmp_path: Path) -> None:
    config = create_encoder("random-cnn").config
    tight = Encoder(RoomFor(MIN_BATCH, config.embed_dim), config)
    with pytest.raises(DeviceOutOfMemoryError, match=r"out of memory on the 16 tiles") as info:
        probe_forward(tight)
    err = info.value
    assert isinstance(err, MemoryError) and isinstance(err.__cause__, torch.OutOfMemoryError)
    assert f"pass batch_size={MIN_BATCH} or smaller" in str(err) and "--" not in str(err)
    assert err.parameters == ("batch_size", "precision")
    parser = build_parser()
    embed_cli = command_parser(parser, parser.parse_args(["embed", "ROOT", "--encoder", "x"]))
    worded = in_command_words(err, embed_cli)
    assert f"pass --batch-size {MIN_BATCH} or smaller" in worded, worded
    # what the message advises works: batch_size=8 needs no probe and fits
    slide = write_synthetic_slide(tmp_path / "s.tiff", (1000, 1000), seed=4)
    config = TilingConfig(tile_size=224, codec="zstd", tissue_threshold=0.0)
    tile_slide(slide, tmp_path / "root", config)
    summary = embed(tmp_path / "root", tight, batch_size=MIN_BATCH, device="cpu", workers=0)
    assert not summary.failed and summary.tiles_done > MIN_BATCH
    # a batch the device cannot hold while embedding fails its slide with the same advice,
    # and nothing of it is left behind
    again = embed(
        tmp_path / "root", tight, batch_size=2 * MIN_BATCH, device="cpu", workers=0, resume=False
    )
    (failed,) = again.failed
    assert failed.error_type == "DeviceOutOfMemoryError"
    assert f"(batch_size={2 * MIN_BATCH}); pass a smaller batch_size" in failed.error
    worded = in_command_words(failed.exception, embed_cli)
    assert f"(batch_size={2 * MIN_BATCH}); pass a smaller batch_size" in worded, worded
    assert worded.endswith("(command line: --batch-size)")
    # the outcome kept for the rest of the job keeps CUDA's error, not the frames (and so the
    # batch on the device) it was raised in
    cause = failed.exception.__cause__
    assert isinstance(cause, torch.OutOfMemoryError) and cause.__traceback__ is None
    store = open_store(tmp_path / "root").slide(open_store(tmp_path / "root").slide_ids[0])
    assert not any(p.name.endswith(".partial") for p in (store.path / "embeddings").iterdir())


@pytest.mark.gpu
def test_the_cuda_probe_on_a_full_device_is_a_typed_error() -> None:
    """The device filled to the last block: the probe's real CUDA out-of-memory becomes the
    typed error, and the device is usable again once the memory is freed."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    enc = create_encoder("random-vit-small", device="cuda")
    filler = []
    for block in (2**30, 64 * MiB, 2 * MiB):
        while True:
            try:
                filler.append(torch.empty(block, dtype=torch.uint8, device="cuda"))
            except torch.OutOfMemoryError:
                break
    try:
        with pytest.raises(DeviceOutOfMemoryError, match=r"cuda(:0)?: .*GiB free of") as info:
            auto_batch_size(enc)
        assert info.value.parameters == ("batch_size", "precision")
    finally:
        filler.clear()
        torch.cuda.empty_cache()
    assert MIN_BATCH <= auto_batch_size(enc) <= MAX_BATCH
