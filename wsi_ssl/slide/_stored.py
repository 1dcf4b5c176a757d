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

import io
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, JpegImagePlugin

from wsi_ssl.errors import CorruptSlideError

__all__ = ["APERIO_J2K_YCBCR", "StoredTiles", "ycbcr_to_rgb"]

APERIO_J2K_YCBCR = 33003
"""TIFF compression of Aperio's JPEG 2000 whose components are YCbCr (no colour transform)."""

_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"


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

    def jpeg(self, row: int, col: int) -> bytes:
        """Tile (row, col) as a self-contained JPEG stream (shared tables merged in).

        Raises:
            CorruptSlideError: the stream's header is not a frame of the tile's size and
                three components.
        """
        data = self._with_tables(self.raw(row, col))
        self._check_jpeg_header(row, col, data)
        return data

    def _with_tables(self, data: bytes) -> bytes:
        tables = self.page.jpegtables
        if tables:  # tables' SOI..DQT/DHT, then the tile without its own SOI
            return bytes(tables).removesuffix(_JPEG_EOI) + data.removeprefix(_JPEG_SOI)
        return data

    def _check_jpeg_header(self, row: int, col: int, stream: bytes) -> None:
        """Refuse a JPEG whose frame header is not this level's tile (size or components)."""
        th, tw = self.tile_shape
        try:  # the plugin parses the markers up to the scan (no decode, no size check)
            with JpegImagePlugin.JpegImageFile(io.BytesIO(stream)) as image:
                size, bands = image.size, len(image.getbands())
        except (OSError, ValueError, SyntaxError) as err:
            detail = f"not a readable JPEG header ({type(err).__name__}: {err})"
        else:
            if size == (tw, th) and bands == 3:
                return
            detail = f"JPEG header says {size[0]}x{size[1]} with {bands} components"
        raise CorruptSlideError(
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
            self._check_jpeg_header(row, col, self._with_tables(data))
        try:
            pixels, _, _ = self.page.decode(data, index, jpegtables=self.page.jpegtables)
            return self.as_rgb(np.asarray(pixels).reshape(*self.tile_shape, 3))
        except (ValueError, RuntimeError, OSError, IndexError, KeyError) as err:
            raise CorruptSlideError(
                self.path, f"stored tile row {row}, column {col}: {type(err).__name__}: {err}"
            ) from err
