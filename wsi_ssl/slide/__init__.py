"""Whole-slide image readers behind one protocol, chosen by a registry with fallback.

Each backend module registers its reader when imported, so the imports below set the
fallback order of `BACKENDS` that `open_slide` follows: openslide, then tiffslide, then
wsidicom.
"""

from wsi_ssl.slide._base import MPP_RANGE, MPP_SOURCES, BaseSlideReader, SlideReader, state_mpp
from wsi_ssl.slide._openslide import OpenSlideReader
from wsi_ssl.slide._registry import BACKENDS, open_slide, register_backend
from wsi_ssl.slide._stored import StoredTiles
from wsi_ssl.slide._tiffslide import TiffSlideReader, tiled_tiff_levels
from wsi_ssl.slide._wsidicom import WsiDicomReader, same_instance, series_files

__all__ = [
    "BACKENDS",
    "MPP_RANGE",
    "MPP_SOURCES",
    "BaseSlideReader",
    "OpenSlideReader",
    "SlideReader",
    "StoredTiles",
    "TiffSlideReader",
    "WsiDicomReader",
    "open_slide",
    "register_backend",
    "same_instance",
    "series_files",
    "state_mpp",
    "tiled_tiff_levels",
]
