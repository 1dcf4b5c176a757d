"""The tile grid of a slide at a physical scale, in level-0 pixel coordinates."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import ConfigError
from wsi_ssl.slide import SlideReader

SNAP_TOLERANCE = 0.02
"""A pyramid level within 2% of the target scale is used as is, without resampling
(a 0.499 µm/px scan tiled at 0.5 µm/px keeps its native pixels)."""

MAX_UPSAMPLING = 2.0
"""Most a target scale may enlarge the slide's finest level without ``allow_upsampling``."""


@dataclass(frozen=True)
class TileGrid:
    """Where tiles are cut and how they are read.

    Attributes:
        dimensions: slide level-0 (width, height).
        level: pyramid level tiles are read from (at or finer than the target scale).
        level_downsample: that level's downsample from level 0.
        tile_size: output tile edge in pixels.
        tile_size_level0: tile edge in level-0 pixels.
        stride_level0: distance between neighbouring tiles in level-0 pixels.
        resize: whether tiles read at ``level`` are resampled to ``tile_size``.
        mpp_effective: the microns per pixel of the stored tiles.
    """

    dimensions: tuple[int, int]
    level: int
    level_downsample: float
    tile_size: int
    tile_size_level0: float
    stride_level0: float
    resize: bool
    mpp_effective: float

    @classmethod
    def for_slide(cls, reader: SlideReader, slide_mpp: float, config: TilingConfig) -> TileGrid:
        """Pick the read level and the level-0 geometry for ``config`` on this slide.

        Raises:
            ConfigError: the target scale enlarges level 0 more than ``MAX_UPSAMPLING`` times
                (unless ``config.allow_upsampling``), or the grid plans more than
                ``config.max_tiles`` tiles.
        """
        scale = config.mpp / slide_mpp  # level-0 pixels per output pixel
        if scale * MAX_UPSAMPLING < 1 and not config.allow_upsampling:
            raise ConfigError(
                f"{reader.path}: mpp={config.mpp} enlarges the slide's finest level "
                f"({slide_mpp:g} µm/px) {1 / scale:.3g}x, more than {MAX_UPSAMPLING:g}x; use "
                f"mpp >= {slide_mpp / MAX_UPSAMPLING:g}, or set allow_upsampling=True "
                "to invent those pixels anyway",
                parameters=("mpp", "allow_upsampling"),
            )
        level = reader.best_level_for_downsample(scale * (1 + SNAP_TOLERANCE))
        downsample = float(reader.level_downsamples[level])
        snapped = abs(scale / downsample - 1) <= SNAP_TOLERANCE
        if snapped:
            scale = downsample
        grid = cls(
            dimensions=tuple(reader.dimensions),  # type: ignore[arg-type]
            level=level,
            level_downsample=downsample,
            tile_size=config.tile_size,
            tile_size_level0=config.tile_size * scale,
            stride_level0=(config.tile_size - config.overlap) * scale,
            resize=not snapped,
            mpp_effective=slide_mpp * scale,
        )
        rows, cols = grid.shape
        if rows * cols > config.max_tiles:
            raise ConfigError(
                f"{reader.path}: the grid plans {rows * cols:,} tiles ({rows} x {cols}), more "
                f"than max_tiles={config.max_tiles}; check mpp ({config.mpp}) and tile_size "
                f"({config.tile_size}), or raise max_tiles to allow it",
                parameters=("mpp", "tile_size", "max_tiles"),
            )
        return grid

    def _positions(self, extent: int) -> np.ndarray:
        n = (
            1
            if extent <= self.tile_size_level0
            else 1 + math.ceil((extent - self.tile_size_level0) / self.stride_level0)
        )
        return np.round(np.arange(n) * self.stride_level0).astype(np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the full grid; edge tiles overhang the slide and are padded."""
        return len(self._positions(self.dimensions[1])), len(self._positions(self.dimensions[0]))

    def all_coords(self) -> np.ndarray:
        """int64 (rows*cols, 2) level-0 (x, y) of every grid cell, row-major (file order)."""
        xs = self._positions(self.dimensions[0])
        ys = self._positions(self.dimensions[1])
        gx, gy = np.meshgrid(xs, ys)
        return np.stack([gx.ravel(), gy.ravel()], axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "level_downsample": self.level_downsample,
            "tile_size_level0": self.tile_size_level0,
            "stride_level0": self.stride_level0,
            "resize": self.resize,
            "mpp_effective": self.mpp_effective,
            "grid_shape": list(self.shape),
        }
