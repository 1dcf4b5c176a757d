"""Reader backed by wsidicom: DICOM whole-slide images, as a folder of instances or any one
file of a series (the other instances of that series are found beside it).

Registered after openslide and tiffslide: it opens what they refuse, such as a folder of
DICOM instances, or instances without ``ImageType`` (each read with the flavour its header
implies, pyramid level, label, overview or thumbnail: `wsi_ssl.slide._dicom_flavour`). wsidicom is imported only when a slide is opened through it.
"""

from __future__ import annotations

import filecmp
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl.errors import UnsupportedSlideError
from wsi_ssl.slide._base import BaseSlideReader, SlideMetadata, to_rgb
from wsi_ssl.slide._dicom_flavour import lacks_image_type, open_with_flavours
from wsi_ssl.slide._registry import register_backend

__all__ = ["WsiDicomReader", "same_instance", "series_files"]

MPP_KEY = "wsidicom.mpp-x"


def _uid(path: Path, keyword: str) -> str | None:
    """The UID ``keyword`` (``SeriesInstanceUID``, ``SOPInstanceUID``) of a DICOM file's
    header, or None where it has none or is no DICOM file."""
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[keyword])
    except (OSError, pydicom.errors.InvalidDicomError):
        return None
    return str(header.get(keyword, "")) or None


def series_files(path: Path) -> list[Path]:
    """The DICOM files of ``path``'s series: a folder's ``.dcm`` files, or the files beside a
    ``.dcm`` file that share its SeriesInstanceUID."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
    own = _uid(path, "SeriesInstanceUID")
    if own is None:
        return [path]
    siblings = (p for p in path.parent.iterdir() if p.suffix.lower() == ".dcm" and p != path)
    return sorted([path, *(p for p in siblings if _uid(p, "SeriesInstanceUID") == own)])


def same_instance(a: Path, b: Path) -> bool:
    """Whether two files are copies of one DICOM instance: the same SOPInstanceUID, or (where
    either has none) the same bytes; False for a folder."""
    if not (a.is_file() and b.is_file()):
        return False
    uid = _uid(a, "SOPInstanceUID")
    other = _uid(b, "SOPInstanceUID")
    if uid is not None and other is not None:
        return uid == other
    return filecmp.cmp(a, b, shallow=False)


@register_backend("wsidicom")
class WsiDicomReader(BaseSlideReader):
    """`SlideReader` over `wsidicom.WsiDicom` (the base pyramid, first focal plane and
    optical path); level indices are positions in that pyramid, finest first."""

    _decode_errors = (ValueError, RuntimeError, OSError, KeyError)
    _slide: Any

    def _open(self) -> SlideMetadata:
        if self.path.is_file() and self.path.suffix.lower() != ".dcm":
            raise UnsupportedSlideError(self.path, {self.backend: "not a .dcm file or folder"})
        from wsidicom import WsiDicom

        files = series_files(self.path)
        if not files:
            raise UnsupportedSlideError(self.path, {self.backend: "no .dcm file in the folder"})
        untyped = [f for f in files if lacks_image_type(f)]
        flavours: dict[Path, str] = {}
        try:
            if untyped:
                self._slide, flavours = open_with_flavours(files)
            else:
                self._slide = WsiDicom.open(files)
        except Exception as err:  # wsidicom raises its own error types for unusable series
            raise UnsupportedSlideError(self.path, {self.backend: str(err)}) from err
        levels = list(self._slide.levels)
        self._level_numbers = [int(level.level) for level in levels]
        width0 = levels[0].size.width
        mpp = float(levels[0].mpp.width)
        return SlideMetadata(
            level_dimensions=tuple((lv.size.width, lv.size.height) for lv in levels),
            level_downsamples=tuple(width0 / lv.size.width for lv in levels),
            properties={
                MPP_KEY: str(mpp),
                "wsidicom.files": str(len(files)),
                "wsidicom.image-type-inferred": str(len(untyped)),
                **{
                    f"wsidicom.inferred.{k.lower()}": str(n)
                    for k, n in Counter(flavours.values()).items()
                },
            },
            vendor="dicom",
        )

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        downsample = self.level_downsamples[level]
        origin = (round(location[0] / downsample), round(location[1] / downsample))
        region = self._slide.read_region(origin, self._level_numbers[level], size, as_array=True)
        return to_rgb(np.asarray(region), alpha=np.asarray(region).shape[-1] == 4)

    def _close(self) -> None:
        self._slide.close()
