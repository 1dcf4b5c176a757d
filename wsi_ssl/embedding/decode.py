"""Decoding stored JPEG tiles in the main process, on the encoder's device.

With ``EmbedConfig.decode`` "device" (or "auto" on CUDA) the loader workers of a JPEG store
only read each tile's stored stream (:meth:`~wsi_ssl.storage.tile_reader.TileReader.read_encoded`)
and pass a batch as one flat byte tensor plus the stream sizes; the main process decodes the
whole batch with ``torchvision.io.decode_jpeg(streams, device=...)``: batched nvJPEG on CUDA,
libjpeg-turbo on the CPU (the same call, so the path is tested on the CPU). Stores with another
codec are decoded by the workers as before. A batch nvJPEG refuses is decoded again on the
CPU with the store's own decoder (libjpeg-turbo through imagecodecs); a tile that decoder
refuses too is a :class:`~wsi_ssl.errors.TileReadError` for its slide.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import imagecodecs
import numpy as np
import torch

from wsi_ssl.errors import TileReadError

__all__ = ["PIXEL_TOLERANCE", "decode_jpeg_batch", "on_device"]

PIXEL_TOLERANCE = {"cpu": 0.0, "cuda": 2.0}
"""Mean absolute difference (8-bit levels, per tile) allowed between a tile decoded here and
by the store's CPU decoder. On the CPU none: both are libjpeg-turbo with the same IDCT and
upsampling, equal bits (tests/test_embed_decode.py). On CUDA nvJPEG rounds its IDCT and chroma
upsampling differently: 2 levels, the bound torchvision's own nvJPEG test sets against
libjpeg-turbo (the ``gpu``-marked test checks it on real H&E tiles)."""


def on_device(mode: str, device: torch.device) -> bool:
    """Whether JPEG tiles are decoded in the main process on ``device`` ("auto": on CUDA)."""
    return mode == "device" or (mode == "auto" and device.type == "cuda")


def _torchvision_decode(streams: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 marks its image I/O as deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        return list(decode_jpeg(streams, mode=ImageReadMode.RGB, device=device))


def _cpu_decode(streams: list[torch.Tensor], path: Path, tiles: np.ndarray) -> list[torch.Tensor]:
    images = []
    for stream, tile in zip(streams, tiles, strict=True):
        try:
            image = imagecodecs.jpeg8_decode(stream.numpy().tobytes())
        except Exception as err:
            row = int(tile)
            raise TileReadError(path, row, row + 1, f"{type(err).__name__}: {err}") from err
        images.append(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    return images


def decode_jpeg_batch(
    data: torch.Tensor, sizes: torch.Tensor, device: torch.device, path: Path, tiles: np.ndarray
) -> torch.Tensor:
    """uint8 (B, T, T, 3) tiles on ``device`` from ``data``, B JPEG streams back to back of
    ``sizes`` bytes: tiles number ``tiles`` (B, sorted; not consecutive where QC-flagged tiles
    are skipped) of the array at ``path``, for messages."""
    streams = list(torch.split(data.cpu(), sizes.tolist()))
    try:
        images = _torchvision_decode(streams, device)
    except RuntimeError:  # a stream nvJPEG/libjpeg refuses: the store's decoder, tile by tile
        images = [im.to(device) for im in _cpu_decode(streams, path, tiles)]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        first, last = int(tiles[0]), int(tiles[-1])
        raise TileReadError(path, first, last + 1, f"tiles of shapes {sorted(shapes)}")
    return torch.stack(images).permute(0, 2, 3, 1)
