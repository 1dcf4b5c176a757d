"""Codecs of a slide store's Zarr v3 arrays, and what a chunk that does not decode means.

Tiles: JPEG (lossy, compact) or zstd (lossless), one tile per inner chunk inside shards, so
each inner chunk is one RGB image and an image codec applies directly. The JPEG codec is
registered with Zarr under the name ``wsi_ssl.jpeg`` on import and through the ``zarr.codecs``
entry point, so any Zarr reader with wsi-ssl installed can decode the stores. Every other
array (coords, tissue fraction, thumbnail, tissue mask, ``qc/<metric>``, ``labels/<name>``):
:data:`CHECKED_ZSTD`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, cast

import imagecodecs
import numpy as np
import zarr
from zarr.abc.codec import ArrayBytesCodec
from zarr.codecs import BytesCodec, ZstdCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDArrayLike, NDBuffer

from wsi_ssl.errors import StoreCorruptError

JPEG_CODEC_NAME = "wsi_ssl.jpeg"

CHECKED_ZSTD = ZstdCodec(level=0, checksum=True)
"""The compressor of every array of a slide store but the tiles (whose shard files have their
CRC32C), the embeddings' included: zstd at zarr's default level, each frame carrying the
checksum of its content, so a changed byte fails to decode (:func:`read_values`) instead of
reading as other values. Stores written before it have
zarr's default, the same zstd without the checksum: the codec is recorded in each array's
``zarr.json``, so both read, to the same values."""


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """Encodes a uint8 RGB chunk of shape (..., H, W, 3) as one baseline JPEG (libjpeg-turbo)."""

    is_fixed_size = False
    quality: int = 90

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(quality=int(data.get("configuration", {}).get("quality", 90)))

    def to_dict(self) -> dict[str, Any]:
        return {"name": JPEG_CODEC_NAME, "configuration": {"quality": self.quality}}

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        image = imagecodecs.jpeg8_decode(chunk_bytes.as_numpy_array().tobytes())
        # zarr's NDArrayLike protocol predates numpy 2's overloaded ndarray stubs (zarr casts too)
        pixels = cast(NDArrayLike, image.reshape(chunk_spec.shape))
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(pixels)

    def encode_tile(self, tile: np.ndarray) -> bytes:
        """JPEG bytes of a uint8 (..., H, W, 3) array, stacked vertically."""
        image = np.ascontiguousarray(tile).reshape(-1, tile.shape[-2], tile.shape[-1])
        return bytes(imagecodecs.jpeg8_encode(image, level=self.quality))

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        encoded = self.encode_tile(chunk_array.as_numpy_array())
        return chunk_spec.prototype.buffer.from_bytes(encoded)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return self._decode_sync(chunk_bytes, chunk_spec)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return self._encode_sync(chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError("JPEG output size is data dependent")


zarr.registry.register_codec(JPEG_CODEC_NAME, JpegCodec)


def tile_codecs(codec: str, jpeg_quality: int) -> dict[str, Any]:
    """Keyword arguments for ``zarr.create_array`` that select a tile codec."""
    if codec == "jpeg":
        return {"serializer": JpegCodec(quality=jpeg_quality), "compressors": None}
    return {"serializer": BytesCodec(), "compressors": ZstdCodec(level=3)}


def read_values(array: zarr.Array[Any], store_path: str | Path, name: str) -> np.ndarray:
    """``array``'s values (member ``name`` of the store at ``store_path``); a chunk file that
    does not decode (its codec's RuntimeError, :data:`CHECKED_ZSTD`'s checksum included; a
    frame of the wrong size's ValueError) is a :class:`StoreCorruptError`: bytes damaged since
    tiling."""
    try:
        return np.asarray(array[...])
    except (RuntimeError, ValueError) as err:
        detail = f"a chunk file of {name} does not decode: {type(err).__name__}: {err}"
        raise StoreCorruptError(store_path, detail) from err
