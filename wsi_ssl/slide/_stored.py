"""Direct access to the tiles a TIFF stores for one pyramid level: raw bytes and pixels.

When a tile grid lines up with the file's own tiles, the extractor decodes each stored tile
once (no region assembly), or, for a JPEG store, copies the scanner's JPEG stream into the
Zarr store untouched: no decode, no re-encode, no second generation of JPEG loss.

A JPEG stream's header is checked before it is copied or decoded: its frame (SOF) must have
the tile's width, height and three components. The decoders allocate what the header says,
so a crafted header would otherwise plant a decompression bomb in the store.

Aperio's JPEG 2000 with YCbCr components (compression 33003, many TCGA slides) stores Y, Cb,
Cr without the codec's colour transform and tags the page RGB: tifffile, tiffslide and
OpenJPEG return the components as they are, so every decode here converts them to RGB.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from wsi_ssl.errors import CorruptSlideError

__all__ = ["APERIO_J2K_YCBCR", "StoredTiles", "ycbcr_to_rgb"]

APERIO_J2K_YCBCR = 33003
"""TIFF compression of Aperio's JPEG 2000 whose components are YCbCr (no colour transform)."""

_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
_SOS = 0xDA
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (not DHT, JPG, DAC)


def _jpeg_header(stream: bytes) -> tuple[frozenset[int], tuple[int, int, int] | None]:
    """The marker codes of a JPEG ``stream``'s segments before its first scan, and its frame's
    (height, width, components) from the first SOF segment (None without one)."""
    markers: set[int] = set()
    frame = None
    i = 2  # after SOI
    while i + 4 <= len(stream) and stream[i] == 0xFF:
        marker = stream[i + 1]
        if marker == _SOS:
            break
        markers.add(marker)
        if marker in _SOF and frame is None and i + 10 <= len(stream):
            h, w = (int.from_bytes(stream[j : j + 2], "big") for j in (i + 5, i + 7))
            frame = (h, w, stream[i + 9])
        i += 2 + int.from_bytes(stream[i + 2 : i + 4], "big")
    return frozenset(markers), frame


def ycbcr_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 3) YCbCr components (full range, JFIF / BT.601, as openslide reads
    Aperio's 33003) as RGB."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels), "YCbCr").convert("RGB"))


@dataclass(frozen=True)
class StoredTiles:
    """One level's stored tiles, read through an open `tifffile.TiffPage`.

    Not thread-safe (one file handle): use one instance per thread, like the reader.
    """

    path: Path
    page: tifffile.TiffPage

    @classmethod
    def of(cls, path: Path, page: tifffile.TiffPage) -> StoredTiles | None:
        """Stored-tile access to ``page``, or None when its tiles are not plain 8-bit RGB."""
        plain = (
            page.is_tiled
            and not page.is_ndpi  # NDPI "tiles" are synthesised from strips
            and page.samplesperpixel == 3
            and page.bitspersample == 8
            and page.planarconfig == tifffile.PLANARCONFIG.CONTIG
            and page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
            and page.imagedepth == 1
        )
        return cls(path, page) if plain else None

    @property
    def tile_shape(self) -> tuple[int, int]:
        """(height, width) of one stored tile."""
        return int(self.page.tilelength), int(self.page.tilewidth)

    @property
    def columns(self) -> int:
        return -(-int(self.page.imagewidth) // self.tile_shape[1])

    @cached_property
    def jpeg_passthrough(self) -> bool:
        """Whether a stored tile, tables merged, is a JPEG any decoder reads as the same RGB.

        True for YCbCr JPEG (the usual scanner encoding); RGB-in-JPEG without an Adobe marker
        (Aperio's "RGB" JPEG) would be colour-converted by a plain decoder, so it is decoded.
        """
        return (
            self.page.compression == tifffile.COMPRESSION.JPEG
            and self.page.photometric == tifffile.PHOTOMETRIC.YCBCR
        )

    def as_rgb(self, pixels: np.ndarray) -> np.ndarray:
        """Decoded components as RGB: converted from YCbCr for Aperio's 33003, else as they are."""
        return ycbcr_to_rgb(pixels) if self.page.compression == APERIO_J2K_YCBCR else pixels

    def raw(self, row: int, col: int) -> bytes:
        """The stored bytes of tile (row, col), as in the file."""
        index = row * self.columns + col
        fh = self.page.parent.filehandle
        fh.seek(self.page.dataoffsets[index])
        return bytes(fh.read(self.page.databytecounts[index]))

    def jpeg(self, row: int, col: int) -> tuple[bytes, frozenset[int]]:
        """Tile (row, col) as a self-contained JPEG stream (shared tables merged in), and the
        marker codes of its header segments before the scan.

        Raises:
            CorruptSlideError: the stream's header is not a frame of the tile's size and
                three components.
        """
        return self._checked_jpeg(row, col, self.raw(row, col))

    def _checked_jpeg(self, row: int, col: int, data: bytes) -> tuple[bytes, frozenset[int]]:
        """``data`` (tile (row, col) as stored) with the shared tables merged in, refused
        unless its frame header is this level's tile (size, three components)."""
        tables = self.page.jpegtables
        if tables:  # the tables' SOI..DQT/DHT, then the tile without its own SOI
            data = bytes(tables).removesuffix(_JPEG_EOI) + data.removeprefix(_JPEG_SOI)
        markers, frame = _jpeg_header(data)
        th, tw = self.tile_shape
        if frame is None:
            detail = "not a readable JPEG header (no frame before the scan)"
        elif frame != (th, tw, 3):
            detail = f"JPEG header says {frame[1]}x{frame[0]} with {frame[2]} components"
        else:
            return data, markers
        raise self.corrupt(row, col, detail)

    def corrupt(self, row: int, col: int, detail: str) -> CorruptSlideError:
        """The error for stored tile (row, col) that cannot be copied or decoded (``detail``
        says why)."""
        th, tw = self.tile_shape
        return CorruptSlideError(
            self.path,
            f"stored tile row {row}, column {col}: {detail}, the level's tiles are {tw}x{th} "
            "RGB; refusing to copy or decode it",
        )

    def read(self, x: int, y: int, size: tuple[int, int]) -> np.ndarray:
        """The level's pixels from (x, y) (level pixels), ``size`` (w, h) inside the image,
        assembled from each stored tile the region touches, decoded once."""
        w, h = size
        th, tw = self.tile_shape
        out = np.empty((h, w, 3), dtype=np.uint8)
        for row in range(y // th, (y + h - 1) // th + 1):
            for col in range(x // tw, (x + w - 1) // tw + 1):
                tile = self.decode(row, col)
                ty, tx = row * th, col * tw
                y0, y1 = max(y, ty), min(y + h, ty + th)
                x0, x1 = max(x, tx), min(x + w, tx + tw)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[y0 - ty : y1 - ty, x0 - tx : x1 - tx]
        return out

    def decode(self, row: int, col: int) -> np.ndarray:
        """Tile (row, col) as RGB uint8 (h, w, 3), decoded as tifffile does.

        Raises:
            CorruptSlideError: the stored bytes do not decode.
        """
        index = row * self.columns + col
        data = self.raw(row, col)
        if self.page.compression == tifffile.COMPRESSION.JPEG:
            self._checked_jpeg(row, col, data)
        try:
            pixels, _, _ = self.page.decode(data, index, jpegtables=self.page.jpegtables)
            return self.as_rgb(np.asarray(pixels).reshape(*self.tile_shape, 3))
        except (ValueError, RuntimeError, OSError, IndexError, KeyError) as err:
            raise CorruptSlideError(
                self.path, f"stored tile row {row}, column {col}: {type(err).__name__}: {err}"
            ) from err
