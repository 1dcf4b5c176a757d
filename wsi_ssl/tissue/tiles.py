"""Tiles on a mask raster: the tissue fraction of each tile, and the pixels the tiles cover."""

from __future__ import annotations

import numpy as np

__all__ = ["tile_cover", "tissue_fraction"]


def tissue_fraction(
    mask: np.ndarray, coords: np.ndarray, tile_size_level0: float, level0_per_mask_px: float
) -> np.ndarray:
    """Fraction of each tile's square that is tissue on the mask raster.

    A tile covers level-0 ``[x, x + tile_size_level0)``; on the mask that is pixel columns
    ``floor(x / s)`` to ``ceil((x + tile_size_level0) / s)`` (``s = level0_per_mask_px``),
    every mask pixel the tile touches, and likewise for rows. Tissue pixels in that box are
    counted with a summed-area table (Crow, 1984) in O(1) per tile; the part of the box
    outside the mask counts as background.

    Args:
        mask: bool (h, w) tissue mask.
        coords: int64 (N, 2) level-0 (x, y) of each tile's top-left corner.
        tile_size_level0: tile edge in level-0 pixels.
        level0_per_mask_px: level-0 pixels per mask pixel.

    Returns:
        float32 (N,) in [0, 1].

    Raises:
        ValueError: wrong array shapes, or a size that is not positive.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2), got shape {coords.shape}")
    if not (tile_size_level0 > 0 and level0_per_mask_px > 0):
        raise ValueError(
            f"tile_size_level0 ({tile_size_level0}) and level0_per_mask_px "
            f"({level0_per_mask_px}) must be > 0"
        )
    h, w = mask.shape
    count = np.int32 if h * w < 2**31 else np.int64  # int32 halves the table's memory traffic
    table = np.zeros((h + 1, w + 1), dtype=count)
    np.cumsum(np.cumsum(mask, axis=0, dtype=count), axis=1, out=table[1:, 1:])

    start = np.floor(coords / level0_per_mask_px).astype(np.int64)
    stop = np.ceil((coords + tile_size_level0) / level0_per_mask_px).astype(np.int64)
    x0, x1 = np.clip(start[:, 0], 0, w), np.clip(stop[:, 0], 0, w)
    y0, y1 = np.clip(start[:, 1], 0, h), np.clip(stop[:, 1], 0, h)
    tissue = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    box = (stop[:, 0] - start[:, 0]) * (stop[:, 1] - start[:, 1])
    return (tissue / box).astype(np.float32)


def tile_cover(
    shape: tuple[int, int], coords: np.ndarray, tile_size_level0: float, level0_per_px: float
) -> np.ndarray:
    """The pixels of an (h, w) raster that the tiles at ``coords`` cover.

    A raster pixel is covered when its centre lies in a tile's level-0 square
    ``[x, x + tile_size_level0)``; ``level0_per_px`` is level-0 pixels per raster pixel.

    Returns:
        bool (h, w).
    """
    h, w = shape
    cover = np.zeros((h + 1, w + 1), dtype=np.int32)
    start = np.ceil(coords / level0_per_px - 0.5).astype(np.int64)
    stop = np.ceil((coords + tile_size_level0) / level0_per_px - 0.5).astype(np.int64)
    x0, x1 = np.clip(start[:, 0], 0, w), np.clip(stop[:, 0], 0, w)
    y0, y1 = np.clip(start[:, 1], 0, h), np.clip(stop[:, 1], 0, h)
    # each tile adds +1 inside its box, through the four corners of a difference table
    np.add.at(cover, (y0, x0), 1)
    np.add.at(cover, (y0, x1), -1)
    np.add.at(cover, (y1, x0), -1)
    np.add.at(cover, (y1, x1), 1)
    return np.cumsum(np.cumsum(cover, axis=0), axis=1)[:h, :w] > 0
