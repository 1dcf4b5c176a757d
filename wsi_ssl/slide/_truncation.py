"""A TIFF slide cut short: an interrupted copy or download keeps the file's directory (and
so its geometry) but loses the pixel data at its end. Backends open such a file and report
the levels they still find; the damage shows only when a lost tile is read. Checking the
directory's data extents against the file size at open says so at once, before any work.
"""

from __future__ import annotations

import logging
from pathlib import Path

import tifffile

from wsi_ssl.errors import TruncatedSlideError

__all__ = ["check_not_truncated"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF


def check_not_truncated(path: Path) -> None:
    """Raise `TruncatedSlideError` when a TIFF's pages store data past the end of ``path``.

    Files that are not TIFF, or that tifffile cannot parse, are left to the backends.
    """
    with path.open("rb") as f:
        if f.read(4) not in _TIFF_MAGIC:
            return
    size = path.stat().st_size
    quiet = logging.getLogger("tifffile")
    level, quiet.level = quiet.level, logging.CRITICAL  # a cut directory chain is reported here
    try:
        with tifffile.TiffFile(path) as tif:
            for number, page in enumerate(tif.pages):
                offsets, counts = page.dataoffsets, page.databytecounts
                ends = [o + c for o, c in zip(offsets, counts, strict=False) if c > 0]
                if ends and max(ends) > size:
                    raise TruncatedSlideError(
                        path,
                        f"page {number} stores data up to byte {max(ends):,}, the file has "
                        f"{size:,} bytes",
                    )
    except tifffile.TiffFileError:
        return
    finally:
        quiet.level = level
