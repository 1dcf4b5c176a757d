"""DICOM WSI instances without ``ImageType``, as some conversions write them (TCGA's among them),
given the flavour (VOLUME, LABEL, OVERVIEW, THUMBNAIL) that wsidicom requires.

wsidicom (and openslide) read an instance's flavour from the third value of ``ImageType`` and
turn away instances without it. Such a series may hold a label, an overview or a thumbnail
besides the pyramid's levels; read as levels they would corrupt the pyramid (wsidicom keys a
level by its rounded power-of-two scale, so a thumbnail can replace a level, or it fails on a
scale that is not a power of two). Each untyped instance's flavour is inferred from what it
says (PS3.3 C.8.12.4, VL Whole Slide Microscopy Image), against the pyramid's base (the largest
VOLUME instance, or else the largest untyped one that does not show the label):

- it shows the slide label (``SpecimenLabelInImage`` or ``BurnedInAnnotation`` YES; VOLUME and
  THUMBNAIL images "shall not include the label"), or it images another field than the base
  (another ``FrameOfReferenceUID``; an imaged extent, ``ImagedVolumeWidth/Height`` or pixel
  spacing x ``TotalPixelMatrix``, more than 2 % off the base's; no extent at all): LABEL or
  OVERVIEW. An overview shows the whole glass slide (about 25 x 75 mm), a label only the label
  (about square): OVERVIEW when its long side is at least 1.8x its short side, else LABEL;
- the same field at a power-of-two scale of the base (pixel spacing within wsidicom's
  tolerance, or the size within a pixel): VOLUME, a pyramid level;
- the same field at another scale: THUMBNAIL.

Each such file is read through a stream that inserts ``ImageType =
DERIVED\\PRIMARY\\<flavour>\\NONE`` (RESAMPLED for a thumbnail) at its place in the dataset (after
the elements of group 0008 that sort before it). Nothing is written to disk and nothing after
the insertion moves for the decoder: DICOM offsets (frame offset tables) are relative to the
pixel data, not to the file.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "InstanceHeader",
    "image_type",
    "infer_flavours",
    "lacks_image_type",
    "open_with_flavours",
]

SAME_FIELD_TOLERANCE = 0.02
"""Relative difference of imaged extents still taken as the same field of view."""
SCALE_TOLERANCE = 0.01
"""log2 distance of a spacing ratio from an integer still taken as a pyramid level (wsidicom's
``level_scale_tolerance``)."""
OVERVIEW_MIN_ASPECT = 1.8
"""Long over short side from which a label-showing image is the whole slide's overview."""
_HEADER_TAGS = [
    "SOPClassUID",
    "ImageType",
    "TotalPixelMatrixColumns",
    "TotalPixelMatrixRows",
    "ImagedVolumeWidth",
    "ImagedVolumeHeight",
    "SharedFunctionalGroupsSequence",
    "FrameOfReferenceUID",
    "SpecimenLabelInImage",
    "BurnedInAnnotation",
]
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
IMAGE_TYPE_TAG = (0x0008, 0x0008)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_LONG_VRS |= {b"UV"}
_PREAMBLE = 128 + 4  # preamble and "DICM"


def is_dicom(path: Path) -> bool:
    """Whether ``path`` holds a DICOM dataset (its preamble's ``DICM``)."""
    with path.open("rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def lacks_image_type(path: Path) -> bool:
    """Whether ``path`` is a VL whole-slide image instance without ``ImageType``."""
    import pydicom

    try:
        header = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["SOPClassUID", "ImageType"]
        )
    except (OSError, pydicom.errors.InvalidDicomError):
        return False
    return str(header.get("SOPClassUID", "")) == WSI_SOP_CLASS and "ImageType" not in header


def image_type(flavour: str) -> tuple[str, str, str, str]:
    """The ``ImageType`` given to an untyped instance of ``flavour``."""
    return ("DERIVED", "PRIMARY", flavour, "RESAMPLED" if flavour == "THUMBNAIL" else "NONE")


@dataclass(frozen=True)
class InstanceHeader:
    """What an instance says about the image it holds (sizes in pixels, lengths in mm)."""

    flavour: str | None
    """``ImageType`` value 3, None where the instance has no ``ImageType``."""
    size: tuple[int, int]
    spacing: tuple[float, float] | None
    """Pixel spacing (x, y): the columns' then the rows'."""
    imaged: tuple[float, float] | None
    """``ImagedVolumeWidth`` and ``ImagedVolumeHeight``."""
    frame_of_reference: str | None
    shows_label: bool
    whole_slide: bool = True
    """Whether it is a VL Whole Slide Microscopy image instance at all."""
    typed: bool = False
    """Whether it has an ``ImageType`` element: one of fewer than three values gives no
    flavour but is not amended (a second ``ImageType`` would be spliced in); wsidicom decides."""

    @classmethod
    def read(cls, path: Path) -> InstanceHeader:
        """The header of the instance at ``path`` (pixel data not read)."""
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        image_type = list(ds.get("ImageType") or [])
        spacing = None
        with_measures = [
            g.PixelMeasuresSequence[0]
            for g in ds.get("SharedFunctionalGroupsSequence") or []
            if "PixelMeasuresSequence" in g
        ]
        if with_measures and len(with_measures[0].get("PixelSpacing") or []) == 2:
            row_spacing, column_spacing = (float(v) for v in with_measures[0].PixelSpacing)
            spacing = (column_spacing, row_spacing)
        width, height = ds.get("ImagedVolumeWidth"), ds.get("ImagedVolumeHeight")
        return cls(
            flavour=str(image_type[2]).upper() if len(image_type) > 2 else None,
            size=(
                int(ds.get("TotalPixelMatrixColumns", 0)),
                int(ds.get("TotalPixelMatrixRows", 0)),
            ),
            spacing=spacing if spacing and min(spacing) > 0 else None,
            imaged=(float(width), float(height)) if width and height else None,
            frame_of_reference=str(ds.get("FrameOfReferenceUID", "")) or None,
            shows_label="YES" in (ds.get("SpecimenLabelInImage"), ds.get("BurnedInAnnotation")),
            whole_slide=str(ds.get("SOPClassUID", "")) == WSI_SOP_CLASS,
            typed="ImageType" in ds,
        )

    @property
    def extent(self) -> tuple[float, float] | None:
        """The imaged field in mm: ``imaged``, or else the pixel matrix times the spacing."""
        if self.imaged is not None:
            return self.imaged
        if self.spacing is not None:
            return (self.size[0] * self.spacing[0], self.size[1] * self.spacing[1])
        return None


def infer_flavours(headers: dict[Path, InstanceHeader]) -> dict[Path, str]:
    """The flavour of each instance without ``ImageType`` (module docstring's rules)."""
    untyped = {
        path: h
        for path, h in headers.items()
        if h.flavour is None and not h.typed and h.whole_slide
    }
    volumes = [h for h in headers.values() if h.flavour == "VOLUME"]
    candidates = volumes or [h for h in untyped.values() if not h.shows_label]
    base = max(candidates, key=lambda h: h.size[0] * h.size[1], default=None)
    flavours = {}
    for path, header in untyped.items():
        if base is None or header.shows_label or not _same_field(header, base):
            long, short = max(header.size), max(1, min(header.size))
            flavours[path] = "OVERVIEW" if long >= OVERVIEW_MIN_ASPECT * short else "LABEL"
        elif _pyramid_scale(header, base):
            flavours[path] = "VOLUME"
        else:
            flavours[path] = "THUMBNAIL"
    return flavours


def _same_field(header: InstanceHeader, base: InstanceHeader) -> bool:
    """Whether ``header`` images the base's field of view."""
    if header is base:
        return True
    references = {header.frame_of_reference, base.frame_of_reference}
    if None not in references and len(references) > 1:
        return False
    extent, base_extent = header.extent, base.extent
    if extent is None or base_extent is None:
        return False
    return all(
        math.isclose(a, b, rel_tol=SAME_FIELD_TOLERANCE)
        for a, b in zip(extent, base_extent, strict=True)
    )


def _pyramid_scale(header: InstanceHeader, base: InstanceHeader) -> bool:
    """Whether ``header`` is the base shrunk by a power of two: by pixel spacing where both
    have it (as wsidicom assigns levels), else by size within a pixel."""
    if header.spacing is not None and base.spacing is not None:
        scale = math.log2(header.spacing[0] / base.spacing[0])
        return round(scale) >= 0 and math.isclose(scale, round(scale), abs_tol=SCALE_TOLERANCE)
    ratio = base.size[0] / max(1, header.size[0])
    factor = 2 ** max(0, round(math.log2(ratio)))
    return all(abs(n - full / factor) <= 1 for n, full in zip(header.size, base.size, strict=True))


def _insertion_point(path: Path) -> tuple[int, bool] | None:
    """Byte offset where ``ImageType`` goes in the dataset, and whether the dataset is
    implicit VR; None where a group length of group 0008 would have to change too."""
    import pydicom

    implicit = pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID == (
        pydicom.uid.ImplicitVRLittleEndian
    )
    with path.open("rb") as f:
        f.seek(_PREAMBLE + 8)  # (0002,0000) UL, 4-byte value: the file meta group's length
        position = f.tell() + 4 + struct.unpack("<I", f.read(4))[0]
        while True:
            f.seek(position)
            head = f.read(8)
            if len(head) < 8:
                return None
            tag = struct.unpack("<HH", head[:4])
            if tag > IMAGE_TYPE_TAG:
                return position, implicit
            if tag == (0x0008, 0x0000):  # a group length to rewrite: leave such files alone
                return None
            if implicit:
                position += 8 + struct.unpack("<I", head[4:])[0]
            elif head[4:6] in _LONG_VRS:
                position += 12 + struct.unpack("<I", f.read(4))[0]
            else:
                position += 8 + struct.unpack("<H", head[6:])[0]


def _image_type_element(implicit: bool, flavour: str) -> bytes:
    """``ImageType`` (0008,0008) of ``flavour`` as encoded in a little-endian dataset."""
    from pydicom.dataelem import DataElement
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit
    write_data_element(buffer, DataElement(0x00080008, "CS", list(image_type(flavour))))
    return buffer.getvalue()


class _Spliced(io.RawIOBase):
    """A read-only file that is ``path`` with ``insert`` placed at byte ``offset``."""

    def __init__(self, path: Path, offset: int, insert: bytes) -> None:
        super().__init__()
        self._file = path.open("rb")
        self._offset = offset
        self._insert = insert
        self._size = path.stat().st_size + len(insert)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        wanted = min(len(out), max(0, self._size - self._position))
        done = 0
        while done < wanted:
            n = self._read_part(self._position + done, out[done:wanted])
            if n == 0:
                break
            done += n
        self._position += done
        return done

    def _read_part(self, position: int, out: memoryview) -> int:
        """Bytes at ``position`` from one of the three parts (before, inserted, after)."""
        end_of_insert = self._offset + len(self._insert)
        if position < self._offset:
            self._file.seek(position)
            return self._file.readinto(out[: self._offset - position])
        if position < end_of_insert:
            part = self._insert[position - self._offset :][: len(out)]
            out[: len(part)] = part
            return len(part)
        self._file.seek(position - len(self._insert))
        return self._file.readinto(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def open_with_flavours(files: list[Path]) -> tuple[Any, dict[Path, str]]:
    """A ``wsidicom.WsiDicom`` over ``files``, each instance without ``ImageType`` read with the
    flavour inferred for it (:func:`infer_flavours`), and those flavours.

    Raises:
        ValueError: an instance without ``ImageType`` whose header this cannot amend.
        wsidicom's errors: the series is unusable for another reason.
    """
    from upath import UPath
    from wsidicom import WsiDicom
    from wsidicom.file import WsiDicomFileSource
    from wsidicom.file.io import WsiDicomReadIO

    flavours = infer_flavours({path: InstanceHeader.read(path) for path in files if is_dicom(path)})
    streams = []
    try:
        for path in files:
            stream: BinaryIO
            if path in flavours:
                point = _insertion_point(path)
                if point is None:
                    raise ValueError(f"{path}: cannot add ImageType (group 0008 has a length)")
                element = _image_type_element(point[1], flavours[path])
                stream = io.BufferedReader(_Spliced(path, point[0], element))  # type: ignore[assignment]
                # not a local path: wsidicom reads this stream instead of reopening the file
                location = UPath(f"memory://{path.resolve()}")
            else:
                stream, location = path.open("rb"), UPath(path)
            streams.append(WsiDicomReadIO(stream, filepath=location))
        return WsiDicom(WsiDicomFileSource(streams)), flavours
    except Exception:
        for s in streams:
            s.close()
        raise
