"""Mask images as annotations: read at a bounded size, measured exactly on each tile.

A mask image spans the whole slide at any scale. One larger than :data:`MAX_MASK_PIXELS`
is kept with every k-th pixel: a TIFF through tifffile (memory-mapped when uncompressed, else a
stored tile or strip at a time) and a ``.npy`` memory-mapped, so a full-resolution mask of a
100,000 px slide costs a few tens of MB; PNG and JPEG are decoded whole by Pillow (up to its
decompression-bomb bound), then reduced. A tile's share of a
class is the exact area of its square covered by the mask's pixels (a mask pixel the tile
half covers counts half), from a summed-area table interpolated bilinearly: the integral of
a piecewise-constant image is bilinear within each pixel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_ssl.errors import AnnotationError

__all__ = ["LOSSY_SUFFIXES", "MASK_SUFFIXES", "MAX_MASK_PIXELS", "area_fractions", "read_mask"]

MASK_SUFFIXES = (".png", ".npy", ".tif", ".tiff", ".jpg", ".jpeg")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
"""Masks read as binary (foreground: at least half the brightest value): lossy compression
leaves values around 0 and 255 that are no classes."""
MAX_MASK_PIXELS = 1 << 24
"""Largest mask kept whole (4,096² px); a larger one is read with every k-th pixel, finer than
the 16 level-0 px tissue grid on a 65,000 px slide."""
MAX_CHUNK_BYTES = 1 << 28
"""A compressed TIFF is decoded a stored tile or strip at a time; one larger than this (a
whole image in one strip) is refused."""


def read_mask(path: Path) -> np.ndarray:
    """The mask as a 2-D array: integer labels, or boolean for a binary or lossy mask.

    Raises:
        AnnotationError: a colour mask, not 2-D, or a PNG/JPEG too large to read whole.
    """
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = _every_kth(np.load(path, mmap_mode="r", allow_pickle=False))
    elif suffix in (".tif", ".tiff"):
        array = _plain_grey(path, _read_tiff(path))
    else:
        array = _every_kth(_read_with_pil(path))
    if array.ndim != 2 or array.size == 0:
        raise AnnotationError(path, f"a mask must be a 2-D image, got shape {array.shape}")
    if suffix in LOSSY_SUFFIXES:  # JPEG noise is no class: foreground or not
        top = int(array.max())
        return np.asarray((array > 0) & (array >= (top + 1) // 2))
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        return np.asarray(array != 0)  # binary: boolean
    return array


def _stride(shape: tuple[int, ...]) -> int:
    """The smallest k with the mask's every k-th pixel within MAX_MASK_PIXELS."""
    h, w = shape[0], shape[1]
    k = 1
    while -(-h // k) * -(-w // k) > MAX_MASK_PIXELS:
        k += 1
    return k


def _every_kth(array: np.ndarray) -> np.ndarray:
    if array.ndim < 2:
        return np.asarray(array)
    k = _stride(array.shape)
    return np.ascontiguousarray(array[::k, ::k])


def _read_tiff(path: Path) -> np.ndarray:
    """The first page's values as stored (palette indices, 16-bit labels; MINISWHITE turned
    so white is high, as image viewers show it), every k-th pixel beyond the bound: memory-
    mapped when uncompressed, else decoded one stored tile or strip at a time."""
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages.first  # a TiffPage (not a frame)
        k = _stride(page.shape)
        if page.is_memmappable:
            array = np.ascontiguousarray(tifffile.memmap(path, page=0, mode="r")[::k, ::k])
        else:
            chunk = int(np.prod(page.chunks)) * (page.dtype.itemsize if page.dtype else 1)
            if chunk > MAX_CHUNK_BYTES:
                raise AnnotationError(
                    path,
                    f"stored as {chunk / 2**20:,.0f} MiB blocks (strips of {page.chunks[0]} rows),"
                    " too large to read a part at a time; save it as a tiled TIFF",
                )
            with page.aszarr() as store:
                array = np.asarray(zarr.open_array(store, mode="r")[::k, ::k])
        if page.photometric == tifffile.PHOTOMETRIC.MINISWHITE:
            array = ~array if array.dtype == bool else np.iinfo(array.dtype).max - array
    return array


def _plain_grey(path: Path, array: np.ndarray) -> np.ndarray:
    """A colour image whose channels are equal is its grey; other colours are refused."""
    if array.ndim == 3 and array.shape[2] in (3, 4):
        rgb = array[..., :3]
        if (rgb != rgb[..., :1]).any():
            raise AnnotationError(
                path,
                "a colour mask: its classes would merge when made grey; save it as a "
                "label mask (one value per class, 8- or 16-bit) or a palette PNG",
            )
        return np.ascontiguousarray(rgb[..., 0])
    return array


def _read_with_pil(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise AnnotationError(
            path,
            f"too large to read whole ({err}); a mask spans the slide at any scale: save it "
            f"smaller (at most {MAX_MASK_PIXELS:,} px) or as a tiled TIFF, read at reduced scale",
        ) from err
    with image:
        # palette indices and 16-bit values are the labels; grey stored as colour is grey
        if image.mode in ("P", "L", "1") or image.mode.startswith("I"):
            return np.asarray(image)
        if path.suffix.lower() in LOSSY_SUFFIXES:  # thresholded later: brightness decides
            return np.asarray(image.convert("L"))
        return _plain_grey(path, np.asarray(image.convert("RGB")))


def area_fractions(
    raster: np.ndarray,
    coords: np.ndarray,
    tile_size_level0: float,
    level0_per_px: tuple[float, float],
) -> np.ndarray:
    """float32 (N,): the exact share of each tile's square that the raster's true pixels
    cover; a pixel spans ``level0_per_px`` (x, y) level-0 pixels, beyond the raster is false."""
    h, w = raster.shape
    count = np.int32 if h * w < 2**31 else np.int64
    table = np.zeros((h + 1, w + 1), dtype=count)
    np.cumsum(np.cumsum(raster, axis=0, dtype=count), axis=1, out=table[1:, 1:])
    sx, sy = level0_per_px
    x0, y0 = coords[:, 0] / sx, coords[:, 1] / sy
    x1, y1 = x0 + tile_size_level0 / sx, y0 + tile_size_level0 / sy

    def integral(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = np.clip(x, 0, w), np.clip(y, 0, h)
        ix = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
        iy = np.minimum(np.floor(y).astype(np.int64), max(h - 1, 0))
        fx, fy = x - ix, y - iy
        return (
            table[iy, ix] * (1 - fx) * (1 - fy)
            + table[iy, ix + 1] * fx * (1 - fy)
            + table[iy + 1, ix] * (1 - fx) * fy
            + table[iy + 1, ix + 1] * fx * fy
        )

    covered = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    area = (tile_size_level0 / sx) * (tile_size_level0 / sy)
    return np.clip(covered / area, 0.0, 1.0).astype(np.float32)
