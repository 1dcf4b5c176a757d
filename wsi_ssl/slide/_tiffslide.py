"""Reader backed by tiffslide (tifffile + zarr): TIFF-based formats, QPTIFF included."""

from __future__ import annotations

import warnings
from functools import cached_property
from pathlib import Path

import numpy as np
import tifffile

from wsi_ssl.errors import UnsupportedSlideError
from wsi_ssl.slide._base import BaseSlideReader, SlideMetadata, to_rgb
from wsi_ssl.slide._registry import register_backend
from wsi_ssl.slide._stored import APERIO_J2K_YCBCR, StoredTiles, ycbcr_to_rgb

__all__ = ["TiffSlideReader", "tiled_tiff_levels"]

# What tifffile, zarr and imagecodecs raise on files or tiles they cannot parse or decode
# (imagecodecs' codec errors are RuntimeErrors; tifffile's are ValueErrors).
_LIBRARY_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    RuntimeError,
    OSError,
    KeyError,
    IndexError,
)


def tiled_tiff_levels(path: Path) -> tuple[tuple[int, int], ...] | None:
    """The (w, h) levels of the first image series of the TIFF at ``path`` when its level 0
    is stored in tiles, read with tifffile alone; None when it is not such a TIFF.

    That series is the pyramid tiffslide reads for SVS and generic TIFFs, so ``wsi-ssl info``
    can tell, without importing tiffslide (with zarr and fsspec, longer than ``info`` takes
    otherwise), whether tiling will read the slide with it (`open_for_tiling`).
    """
    if not path.is_file():
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if not series.keyframe.is_tiled:
                return None
            return tuple(
                (int(lv.keyframe.imagewidth), int(lv.keyframe.imagelength)) for lv in series.levels
            )
    except (tifffile.TiffFileError, OSError, ValueError, IndexError):
        return None


@register_backend("tiffslide")
class TiffSlideReader(BaseSlideReader):
    """`SlideReader` over `tiffslide.TiffSlide`; channels become RGB via `to_rgb`."""

    _decode_errors = _LIBRARY_ERRORS

    def _open(self) -> SlideMetadata:
        import tiffslide  # with zarr and fsspec under it: only when a slide gets this far

        with warnings.catch_warnings():
            # tiffslide warns that its NDPI/Ventana metadata parsing is partial.
            warnings.filterwarnings("ignore", message=".*metadata parsing", category=UserWarning)
            try:
                self._slide = tiffslide.TiffSlide(self.path)
            except _LIBRARY_ERRORS as err:
                raise self._unsupported(err) from err
            try:
                raw = dict(self._slide.properties)
                level_dimensions = tuple(self._slide.level_dimensions)
                level_downsamples = tuple(float(ds) for ds in self._slide.level_downsamples)
                page = self._level0_page()
            except _LIBRARY_ERRORS as err:
                self._slide.close()
                raise self._unsupported(err) from err
        self._alpha = page.photometric == tifffile.PHOTOMETRIC.RGB and len(page.extrasamples) == 1
        vendor = raw.get("tiffslide.vendor")
        return SlideMetadata(
            level_dimensions=level_dimensions,
            level_downsamples=level_downsamples,
            properties={key: str(value) for key, value in raw.items() if value is not None},
            vendor=str(vendor) if vendor else None,
        )

    def _unsupported(self, err: Exception) -> UnsupportedSlideError:
        return UnsupportedSlideError(self.path, {self.backend: f"{type(err).__name__}: {err}"})

    def _series(self) -> tifffile.TiffPageSeries:
        """The image series tiffslide reads (its levels are the pyramid)."""
        return self._slide.ts_tifffile.series[int(self._slide.properties["tiffslide.series-index"])]

    def _level0_page(self) -> tifffile.TiffPage:
        return self._series().keyframe

    @property
    def tiled(self) -> bool:
        """Whether level 0 is stored in tiles (read per tile) rather than in strips."""
        return bool(self._level0_page().is_tiled)

    def stored_tiles(self, level: int) -> StoredTiles | None:
        """Level ``level``'s stored tiles (plain 8-bit RGB or YCbCr tiles only)."""
        return self._stored_levels.get(level)

    @cached_property
    def _stored_levels(self) -> dict[int, StoredTiles]:
        if self._alpha:
            return {}
        levels = {
            i: StoredTiles.of(self.path, lv.keyframe) for i, lv in enumerate(self._series().levels)
        }
        return {i: stored for i, stored in levels.items() if stored is not None}

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Regions at whole level pixels of a plain tiled level are assembled from its stored
        tiles (no zarr layer, several times faster); the rest goes through tiffslide."""
        ds = self.level_downsamples[level]
        stored = self._stored_levels.get(level)
        if stored is not None and ds.is_integer() and location[0] % ds == location[1] % ds == 0:
            return stored.read(int(location[0] // ds), int(location[1] // ds), size)
        pixels = self._slide.read_region(location, level, size, as_array=True, padding=False)
        rgb = to_rgb(pixels, alpha=self._alpha)
        page = self._series().levels[level].keyframe
        return ycbcr_to_rgb(rgb) if page.compression == APERIO_J2K_YCBCR else rgb

    def _close(self) -> None:
        self._slide.close()
