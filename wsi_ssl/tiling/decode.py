"""A slide's stored JPEG tiles as portable streams, and decoded at reduced scale.

*Portable*: a stored tile, shared tables merged in, that any plain JPEG decoder (libjpeg,
PIL, a browser) reads as the RGB the slide reader gives. YCbCr tiles are that already. Aperio
and others also store JPEG tiles whose components are R, G, B (TIFF photometric RGB) with no
marker saying so; a plain decoder takes three components without a marker for YCbCr and
shifts the colours. An Adobe APP14 marker with transform 0 ("no colour transform") tells every
decoder the components are RGB, so the stream can be copied into a JPEG store as it is.

*Reduced scale*: libjpeg-turbo can run a smaller inverse DCT on each 8 x 8 block (scaled
decoding, through simplejpeg) and return a tile at 1/2, 1/4 or 1/8 of its size for a fraction
of a full decode (2.6x less than decode + 2 x 2 box average on 256 px tiles here). The result
is a low-pass of each block, close to, not equal to, a box average of the fully decoded tile:
within ``REDUCED_TOLERANCE`` on real H&E tiles (tests/test_tile_decode.py measures it).

*JPEG 2000* tiles (many TCGA Aperio files) cost ~30x a JPEG tile to decode; OpenJPEG can
spread one tile's code-blocks over threads, which :func:`decode_stored` asks for. A JPEG 2000
tile also holds its own 1/2, 1/4, 1/8 scale: the low-pass band of its wavelet levels, which
OpenJPEG returns without the finer levels (``reduce``, through Pillow: ~1.7x less CPU than a
full decode at 1/2, ~3.7x at 1/4; one thread, and Pillow holds the GIL while it decodes). That
band is the codec's own downscale, not a box average: its sample n sits on source pixel k*n
where a k x k box's sits on k*n + (k-1)/2, and the 9/7 wavelet's filter is sharper;
``J2K_REDUCED_TOLERANCE`` states how far it lies from each.
"""

from __future__ import annotations

import io

import imagecodecs
import numpy as np
import simplejpeg
import tifffile
from PIL import Image, Jpeg2KImagePlugin

from wsi_ssl.slide import StoredTiles

__all__ = [
    "ADOBE_RGB",
    "J2K_COMPRESSIONS",
    "J2K_REDUCED_TOLERANCE",
    "REDUCED_SCALES",
    "REDUCED_TOLERANCE",
    "decode_reduced",
    "decode_stored",
    "portable_jpeg",
    "reduced_scales",
    "reducible",
]

ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
"""APP14 "Adobe" segment, version 100, flags 0, transform 0: the components are RGB."""

REDUCED_SCALES = (2, 4, 8)
"""Shrink factors libjpeg-turbo decodes in the DCT domain (its scaled inverse DCTs)."""

REDUCED_TOLERANCE = {"mean": 1.5, "p99": 12.0}
"""Mean and 99th-percentile absolute difference (8-bit levels, all channels) allowed between a
tile decoded at 1/k and its full decode box-averaged k x k. Measured on CMU-1 (real H&E) at
k = 2: RGB 4:4:4 tiles mean 0.1, p99 2; YCbCr 4:2:0 q90 tiles mean 1.0, p99 9 (the chroma
is upsampled at the reduced size)."""

J2K_COMPRESSIONS = frozenset({33003, 33004, 33005, 34712})
"""TIFF compressions holding a JPEG 2000 codestream per tile (Aperio's and the standard tag)."""

J2K_REDUCED_TOLERANCE = {
    "centred": {"mean": 2.0, "p99": 16.0},
    "box": {"mean": 12.0, "p99": 90.0},
}
"""Mean and 99th-percentile absolute difference (8-bit levels) allowed between a JPEG 2000 tile
decoded at 1/k (k = 2, 4, 8) and its full decode shrunk k times: "centred", averaged over a k
wide window centred on source pixel k*n, where the wavelet's low-pass sample sits (half
weights at the window's two ends); "box", the usual k x k box, (k-1)/2 source pixels off.
Measured on whole 256 px tiles of CMU-1 pixels (the J2K TIFFs of tests/test_tile_j2k.py and
benchmarks/tiling.py, 9/7 wavelet, 5 levels): centred mean 1.1-1.4, p99 10-13 at every k; box
mean 3.4-3.7 / p99 38-41 (k = 2), 6.1-6.6 / 66-72 (k = 4), 7.8-8.4 / 76-82 (k = 8): the
sub-pixel shift on sharp tissue edges, not damage."""

_J2K_COD, _J2K_SOT = 0x52, 0x90  # coding style default, start of tile-part

_APP0, _APP14 = 0xE0, 0xEE
_PORTABLE_SOF = {0xC0, 0xC1, 0xC2}  # Huffman baseline, extended, progressive: any decoder


def _jpeg_photometric(stored: StoredTiles) -> int | None:
    page = stored.page
    return page.photometric if page.compression == tifffile.COMPRESSION.JPEG else None


def portable_jpeg(stored: StoredTiles, row: int, col: int) -> bytes | None:
    """Stored tile (row, col) as a JPEG stream any decoder reads as the slide's RGB, or None
    where it cannot be made one (not JPEG; lossless or arithmetic-coded frames, which not every
    decoder reads; an RGB tile that already carries a JFIF or Adobe marker, which would
    contradict the TIFF's photometric).

    Raises:
        CorruptSlideError: the stream's frame header is not the level's tile.
    """
    photometric = _jpeg_photometric(stored)
    if photometric not in (tifffile.PHOTOMETRIC.YCBCR, tifffile.PHOTOMETRIC.RGB):
        return None
    stream, markers = stored.jpeg(row, col)
    if not markers & _PORTABLE_SOF:
        return None
    if photometric == tifffile.PHOTOMETRIC.YCBCR:
        return stream
    if markers & {_APP0, _APP14}:
        return None
    return stream[:2] + ADOBE_RGB + stream[2:]


def _j2k_decompositions(stream: bytes) -> int:
    """The wavelet levels a JPEG 2000 codestream's main header (COD marker) declares; 0 where
    it declares none (not a codestream, damage)."""
    i = 2  # after SOC
    while i + 4 <= len(stream) and stream[i] == 0xFF and stream[i + 1] != _J2K_SOT:
        if stream[i + 1] == _J2K_COD and i + 9 < len(stream):
            return stream[i + 9]  # Lcod, Scod, SGcod (4 bytes), then SPcod's level count
        i += 2 + int.from_bytes(stream[i + 2 : i + 4], "big")
    return 0


def reduced_scales(stored: StoredTiles) -> tuple[int, ...]:
    """The k this level's tiles decode at 1/k for: JPEG (RGB or YCbCr) in the DCT domain,
    ``REDUCED_SCALES``; JPEG 2000 from a coarser wavelet level, the powers of two in
    ``REDUCED_SCALES`` its first tile's codestream has levels for."""
    if stored.page.compression in J2K_COMPRESSIONS:
        levels = _j2k_decompositions(stored.raw(0, 0))
        return tuple(k for k in REDUCED_SCALES if k <= 2**levels)
    photometric = _jpeg_photometric(stored)
    ok = photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
    return REDUCED_SCALES if ok else ()


def reducible(stored: StoredTiles, k: int) -> bool:
    """Whether this level's tiles decode at 1/``k`` (:func:`reduced_scales`), the tile's sides
    multiples of ``k`` (whole output pixels)."""
    th, tw = stored.tile_shape
    return th % k == 0 and tw % k == 0 and k in reduced_scales(stored)


def _jpeg_reduced(stream: bytes | None, shape: tuple[int, int], k: int) -> np.ndarray | None:
    """A portable JPEG stream of a (h, w) tile decoded at 1/k in the DCT domain, or None where
    there is no stream or libjpeg-turbo refuses it at reduced scale."""
    if stream is None:
        return None
    try:
        return simplejpeg.decode_jpeg(
            stream, min_height=shape[0] // k, min_width=shape[1] // k, min_factor=k
        )
    except ValueError:
        return None


def _j2k_reduced(stream: bytes, shape: tuple[int, int], k: int) -> np.ndarray | None:
    """A JPEG 2000 codestream of a (h, w) RGB tile decoded from its wavelet level for 1/k, or
    None where it is not such a codestream or OpenJPEG refuses it."""
    try:
        with Jpeg2KImagePlugin.Jpeg2KImageFile(io.BytesIO(stream)) as image:
            if image.size != shape[::-1] or image.mode != "RGB":
                return None  # checked before anything is allocated
            image.reduce = k.bit_length() - 1
            return np.asarray(image)
    except (OSError, ValueError, SyntaxError):
        return None


def decode_reduced(stored: StoredTiles, row: int, col: int, k: int, threads: int = 1) -> np.ndarray:
    """Stored tile (row, col) at 1/``k`` of its size, RGB uint8 (h/k, w/k, 3): a JPEG tile
    decoded in the DCT domain, a JPEG 2000 tile from its wavelet level for 1/k; the full decode
    (:func:`decode_stored`, ``threads``) box-averaged where the codec refuses the reduced
    decode (an unusual subsampling, fewer wavelet levels in this tile, damage: then the full
    decode decides). ``k`` = 1 is the full decode.

    Raises:
        CorruptSlideError: the tile does not decode.
    """
    if k == 1:
        return decode_stored(stored, row, col, threads)
    th, tw = stored.tile_shape
    if stored.page.compression in J2K_COMPRESSIONS:
        pixels = _j2k_reduced(stored.raw(row, col), (th, tw), k)
    else:
        pixels = _jpeg_reduced(portable_jpeg(stored, row, col), (th, tw), k)
    if pixels is not None and pixels.shape == (th // k, tw // k, 3):
        return stored.as_rgb(pixels)
    return np.asarray(Image.fromarray(decode_stored(stored, row, col, threads)).reduce(k))


def decode_stored(stored: StoredTiles, row: int, col: int, threads: int = 1) -> np.ndarray:
    """Stored tile (row, col) as RGB uint8 (h, w, 3), as ``stored.decode`` gives it; a JPEG 2000
    tile is decoded by OpenJPEG with ``threads`` threads (the same pixels, sooner).

    Raises:
        CorruptSlideError: the tile does not decode to the level's tile shape.
    """
    if threads <= 1 or stored.page.compression not in J2K_COMPRESSIONS:
        return stored.decode(row, col)
    try:
        pixels = imagecodecs.jpeg2k_decode(stored.raw(row, col), numthreads=threads)
    except (ValueError, RuntimeError, imagecodecs.Jpeg2kError) as err:
        raise stored.corrupt(row, col, f"does not decode ({err})") from err
    if pixels.shape != (*stored.tile_shape, 3) or pixels.dtype != np.uint8:
        raise stored.corrupt(row, col, f"decodes to {pixels.dtype} {pixels.shape}")
    return stored.as_rgb(pixels)
