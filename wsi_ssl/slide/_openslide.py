"""Reader backed by OpenSlide (Aperio, Hamamatsu, DICOM, generic TIFF and more)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import openslide

from wsi_ssl.errors import UnsupportedSlideError
from wsi_ssl.slide._base import BaseSlideReader, SlideMetadata, tiff_resolution_tags, to_rgb
from wsi_ssl.slide._registry import register_backend

__all__ = ["OpenSlideReader"]

_GENERIC_VENDORS = frozenset({"generic-tiff"})


@register_backend("openslide")
class OpenSlideReader(BaseSlideReader):
    """`SlideReader` over `openslide.OpenSlide`; its RGBA is composited over white."""

    _decode_errors = (openslide.OpenSlideError,)

    def _open(self) -> SlideMetadata:
        try:
            self._slide = openslide.OpenSlide(self.path)
        except openslide.OpenSlideError as err:
            raise UnsupportedSlideError(self.path, {self.backend: str(err)}) from err
        properties = dict(self._slide.properties)
        vendor = properties.get("openslide.vendor")
        return SlideMetadata(
            level_dimensions=tuple(self._slide.level_dimensions),
            level_downsamples=tuple(float(ds) for ds in self._slide.level_downsamples),
            properties=properties,
            vendor=None if vendor in _GENERIC_VENDORS else vendor,
        )

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return to_rgb(np.asarray(self._slide.read_region(location, level, size)), alpha=True)

    def _resolution_tags(self) -> Mapping[str, str]:
        return tiff_resolution_tags(self.path)

    def _close(self) -> None:
        self._slide.close()
