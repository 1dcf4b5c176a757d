"""A TIFF slide cut short: an interrupted copy or download keeps the file's directory (and
so its geometry) but loses the pixel data at its end. Backends open such a file and report
the levels they still find; the damage shows only when a lost tile is read. Checking the
directory's data extents against the file size at open says so at once, before any work.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tifffile

from wsi_ssl.errors import TruncatedSlideError

__all__ = ["check_not_truncated"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_checking = threading.local()


class _QuietWhileChecking(logging.Filter):
    """Drops tifffile's records in the thread that is checking (its complaints about a cut
    directory chain are said once, by `TruncatedSlideError` or by the backends)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(_checking, "active", False):
            return True
        _checking.messages.append(record.getMessage())
        return False


logging.getLogger("tifffile").addFilter(_QuietWhileChecking())


def check_not_truncated(path: Path) -> None:
    """Raise `TruncatedSlideError` when a TIFF's pages (SubIFD levels included) store data
    past the end of ``path``.

    Files that are not TIFF, or that tifffile cannot parse (in any way), are left to the
    backends, which say why they cannot open them.
    """
    with path.open("rb") as f:
        if f.read(4) not in _TIFF_MAGIC:
            return
    size = path.stat().st_size
    _checking.active, _checking.messages = True, []
    try:
        with tifffile.TiffFile(path) as tif:
            ends = [(_data_end(page), number) for number, page in _pages(tif)]
    except Exception:  # a malformed directory breaks a parser in any way: the backends decide
        return
    finally:
        _checking.active = False
    end, number = max(ends, default=(0, 0))
    if end > size:
        raise TruncatedSlideError(
            path, f"page {number} stores data up to byte {end:,}, the file has {size:,} bytes"
        )
    for offset in _invalid_page_offsets(_checking.messages):
        if offset >= size:  # the directory chain goes on past the end: later pages were cut off
            raise TruncatedSlideError(
                path,
                f"page {len(ends)} would start at byte {offset:,}, the file has {size:,} bytes",
            )


def _invalid_page_offsets(messages: list[str]) -> Iterator[int]:
    """The offsets of the next page that tifffile found invalid ("invalid page offset N")."""
    for message in messages:
        found = re.search(r"invalid page offset (\d+)", message)
        if found:
            yield int(found.group(1))


def _pages(tif: tifffile.TiffFile) -> Iterator[tuple[int, Any]]:
    """Every page and, after each, its SubIFD pages (OME pyramids keep their levels there)."""
    for number, page in enumerate(tif.pages):
        yield number, page
        for sub in getattr(page, "pages", None) or ():
            yield number, sub


def _data_end(page: Any) -> int:
    """The byte after the last stored tile or strip of ``page`` (0 without data)."""
    ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=False) if c > 0]
    return max(ends, default=0)
