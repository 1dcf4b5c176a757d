"""Tiles of a grid read straight from a slide, as one array, for tests and benchmarks."""

from __future__ import annotations

import numpy as np

from wsi_ssl.slide import SlideReader
from wsi_ssl.tiling.extract import chunk_tiles
from wsi_ssl.tiling.grid import TileGrid

__all__ = ["read_tiles"]


def read_tiles(reader: SlideReader, grid: TileGrid, coords: np.ndarray) -> np.ndarray:
    """The tiles at ``coords`` (level-0 x, y; row-major), decoded, as uint8 (k, T, T, 3)."""
    t = grid.tile_size
    tiles = [np.asarray(tile) for tile in chunk_tiles(reader, grid, coords)]
    return np.stack(tiles) if tiles else np.empty((0, t, t, 3), dtype=np.uint8)
