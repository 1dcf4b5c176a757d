"""Tile codecs for the Zarr v3 ``tiles`` array: JPEG (lossy, compact) and zstd (lossless).

Tiles are stored one per inner chunk inside shards, so each inner chunk is one RGB image and
an image codec applies directly. The JPEG codec is registered with Zarr under the name
``wsi_ssl.jpeg`` on import and through the ``zarr.codecs`` entry point, so any Zarr reader with
wsi-ssl installed can decode the stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self, cast

import imagecodecs
import numpy as np
import zarr
from zarr.abc.codec import ArrayBytesCodec
from zarr.codecs import BytesCodec, ZstdCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDArrayLike, NDBuffer

JPEG_CODEC_NAME = "wsi_ssl.jpeg"


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
