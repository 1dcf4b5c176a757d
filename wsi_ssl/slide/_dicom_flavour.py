"""DICOM WSI instances without ``ImageType``, as some conversions write them (TCGA's among them),
presented to wsidicom with the VOLUME flavour it requires.

wsidicom (and openslide) read an instance's flavour (VOLUME, LABEL, OVERVIEW, THUMBNAIL) from
the third value of ``ImageType`` and turn away instances without it. A conversion that omits
it writes the pyramid levels only, so those instances are read as VOLUME: each file is read
through a stream that inserts ``ImageType = DERIVED\\PRIMARY\\VOLUME\\NONE`` at its place in
the dataset (after the elements of group 0008 that sort before it). Nothing is written to
disk and nothing after the insertion moves for the decoder: DICOM offsets (frame offset
tables) are relative to the pixel data, not to the file.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["VOLUME_IMAGE_TYPE", "lacks_image_type", "open_as_volume"]

VOLUME_IMAGE_TYPE = ("DERIVED", "PRIMARY", "VOLUME", "NONE")
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
IMAGE_TYPE_TAG = (0x0008, 0x0008)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_LONG_VRS |= {b"UV"}
_PREAMBLE = 128 + 4  # preamble and "DICM"


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


def _image_type_element(implicit: bool) -> bytes:
    """``ImageType`` (0008,0008) as encoded in a little-endian dataset."""
    from pydicom.dataelem import DataElement
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit
    write_data_element(buffer, DataElement(0x00080008, "CS", list(VOLUME_IMAGE_TYPE)))
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


def open_as_volume(files: list[Path]) -> Any:
    """A ``wsidicom.WsiDicom`` over ``files``, the instances without ``ImageType`` read as
    VOLUME (:func:`lacks_image_type`).

    Raises:
        ValueError: an instance without ``ImageType`` whose header this cannot amend.
        wsidicom's errors: the series is unusable for another reason.
    """
    from upath import UPath
    from wsidicom import WsiDicom
    from wsidicom.file import WsiDicomFileSource
    from wsidicom.file.io import WsiDicomReadIO

    streams = []
    try:
        for path in files:
            stream: BinaryIO
            if lacks_image_type(path):
                point = _insertion_point(path)
                if point is None:
                    raise ValueError(f"{path}: cannot add ImageType (group 0008 has a length)")
                raw = _Spliced(path, point[0], _image_type_element(point[1]))
                stream = io.BufferedReader(raw)  # type: ignore[assignment]
                # not a local path: wsidicom reads this stream instead of reopening the file
                location = UPath(f"memory://{path.resolve()}")
            else:
                stream, location = path.open("rb"), UPath(path)
            streams.append(WsiDicomReadIO(stream, filepath=location))
        return WsiDicom(WsiDicomFileSource(streams))
    except Exception:
        for s in streams:
            s.close()
        raise
