"""JPEG tiles decoded on the encoder's device (EmbedConfig.decode): the workers only read the
stored streams, the main process decodes each batch with torchvision.io.decode_jpeg. On the CPU
the same call decodes with libjpeg-turbo (run here); the CUDA (nvJPEG) variants are ``gpu``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch

from wsi_ssl.config import TilingConfig
from wsi_ssl.embedding import EmbedConfig, embed
from wsi_ssl.embedding.decode import PIXEL_TOLERANCE, decode_jpeg_batch, on_device
from wsi_ssl.encoders import create_encoder
from wsi_ssl.errors import ConfigError, TileReadError
from wsi_ssl.storage import open_store
from wsi_ssl.storage.slide_store import open_tiles
from wsi_ssl.storage.tile_reader import TileReader
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide

# 240 px at level 0: CMU-1's own RGB-in-JPEG tiles, passed through (Adobe transform-0 marker);
# 224 px: tiles re-encoded by the tiler (YCbCr 4:2:0, q90)
STORES = {
    "passthrough": TilingConfig(tile_size=240, codec="jpeg", tissue_threshold=0.0),
    "reencoded": TilingConfig(tile_size=224, codec="jpeg", tiles_per_chunk=16),
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def jpeg_roots(tmp_path_factory: pytest.TempPathFactory, cmu_small: Path) -> dict[str, Path]:
    roots = {}
    for name, config in STORES.items():
        roots[name] = tmp_path_factory.mktemp(name)
        tile_slide(cmu_small, roots[name], config)
    return roots


def _reader(root: Path) -> TileReader:
    archive = open_store(root)
    [sid] = archive.slide_ids
    return TileReader(open_tiles(archive.slide(sid).path / "tiles"))


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device(name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("store", sorted(STORES))
def test_device_decode_gives_the_cpu_decoders_pixels(
    jpeg_roots: dict[str, Path], store: str, device: str
) -> None:
    dev = _device(device)
    reader = _reader(jpeg_roots[store])
    assert reader.is_jpeg
    rows = np.arange(min(len(reader), 48))
    want = reader.read(rows)  # the store's own decoder (imagecodecs, in the loader workers)
    streams = reader.read_encoded(rows)
    data = torch.frombuffer(bytearray(b"".join(streams)), dtype=torch.uint8)
    sizes = torch.tensor([len(s) for s in streams])
    got = decode_jpeg_batch(data, sizes, dev, Path("tiles"), np.arange(len(sizes)))
    assert got.device.type == dev.type and got.dtype == torch.uint8
    assert tuple(got.shape) == want.shape
    diff = np.abs(got.cpu().numpy().astype(np.int16) - want.astype(np.int16))
    per_tile = diff.reshape(len(rows), -1).mean(axis=1)
    assert per_tile.max() <= PIXEL_TOLERANCE[dev.type], per_tile.max()
    assert want.std() > 10  # real tissue, not blank tiles


def test_streams_torchvision_refuses_fall_back_to_the_stores_decoder(
    jpeg_roots: dict[str, Path],
) -> None:
    """A truncated stream (torchvision refuses it; the store's decoder, like the CPU path,
    decodes what is there) gives the CPU path's pixels; bytes no decoder reads are a
    TileReadError naming the tile."""
    reader = _reader(jpeg_roots["reencoded"])
    streams = reader.read_encoded([0, 1, 2])
    streams[1] = streams[1][: len(streams[1]) // 3]

    def batch(items: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.frombuffer(bytearray(b"".join(items)), dtype=torch.uint8)
        return data, torch.tensor([len(s) for s in items])

    tiles = np.array([10, 13, 17])  # QC-flagged tiles between them are not in the batch
    got = decode_jpeg_batch(*batch(streams), torch.device("cpu"), Path("x/tiles"), tiles)
    want = np.stack([reader.read([0])[0], imagecodecs.jpeg8_decode(streams[1])])
    np.testing.assert_array_equal(got[:2].numpy(), want)
    streams[1] = b"\xff\xd8 not a jpeg"
    with pytest.raises(TileReadError, match=r"tiles 13\.\.13 cannot be read"):
        decode_jpeg_batch(*batch(streams), torch.device("cpu"), Path("x/tiles"), tiles)


def test_decode_modes() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not on_device("auto", cpu) and on_device("auto", cuda) and on_device("device", cpu)
    assert not on_device("cpu", cuda)
    with pytest.raises(ConfigError, match="decode must be one of cpu, device, auto") as err:
        EmbedConfig(decode="gpu")
    assert err.value.parameters == ("decode",)


def _embed(root: Path, decode: str, device: str, workers: int) -> np.ndarray:
    enc = create_encoder("random-cnn", resize="bilinear")
    config = EmbedConfig(batch_size=16, device=device, workers=workers, dtype="float32")
    summary = embed(root, enc, config, decode=decode, resume=False)
    assert not summary.failed and summary.config["decode"] == decode
    [sid] = open_store(root).slide_ids
    return np.asarray(open_store(root).embeddings(sid, summary.encoder_id).features)


@pytest.mark.parametrize("device", DEVICES)
def test_embeddings_equal_with_either_decoder(jpeg_roots: dict[str, Path], device: str) -> None:
    """End to end through the loader (one worker reading bytes) and the encoder: on the CPU
    the same vectors to float rounding (1e-5); on CUDA, where nvJPEG's pixels differ by up to
    PIXEL_TOLERANCE, every tile's two vectors at cosine similarity >= 0.99."""
    _device(device)
    root = jpeg_roots["passthrough"]
    on_cpu = _embed(root, "cpu", device, workers=1)
    on_device_ = _embed(root, "device", device, workers=1)
    assert on_cpu.shape == on_device_.shape and len(on_cpu) > 50
    if device == "cpu":
        np.testing.assert_allclose(on_device_, on_cpu, rtol=1e-5, atol=1e-5)
    else:
        dot = (on_cpu * on_device_).sum(axis=1)
        cos = dot / (np.linalg.norm(on_cpu, axis=1) * np.linalg.norm(on_device_, axis=1))
        assert cos.min() >= 0.99, cos.min()


def test_stores_of_other_codecs_are_decoded_by_the_workers(tmp_path: Path) -> None:
    slide = write_synthetic_slide(tmp_path / "s.tiff", (700, 500), seed=3)
    config = replace(STORES["reencoded"], codec="zstd", tissue_threshold=0.0)
    tile_slide(slide, tmp_path / "root", config)
    assert not _reader(tmp_path / "root").is_jpeg
    cpu = _embed(tmp_path / "root", "cpu", "cpu", workers=0)
    np.testing.assert_array_equal(_embed(tmp_path / "root", "device", "cpu", workers=1), cpu)
