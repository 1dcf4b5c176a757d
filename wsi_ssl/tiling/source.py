"""The slide a tiling job reads: found in the inputs, fingerprinted, opened once, and its
thumbnail and tissue mask made once for every scale tiled from it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import numpy as np

from wsi_ssl.errors import ConfigError, SlideNotFoundError, WsiSslError
from wsi_ssl.listing import one_or_many
from wsi_ssl.slide import SlideReader, open_slide, series_files
from wsi_ssl.storage import fingerprint_file, slide_id_from_fingerprint
from wsi_ssl.tissue import detect_tissue

__all__ = [
    "SLIDE_SUFFIXES",
    "SlideSource",
    "collect_slide_paths",
    "holds_slide",
    "open_for_tiling",
    "slide_fingerprint",
    "thumbnail_and_mask",
]

SLIDE_SUFFIXES = frozenset(
    {
        ".svs",
        ".tif",
        ".tiff",
        ".ndpi",
        ".vms",
        ".vmu",
        ".scn",
        ".mrxs",
        ".svslide",
        ".bif",
        ".qptiff",
        ".dcm",
    }
)
THUMBNAIL_MAX_SIDE = 4096
FAST_BACKEND = "tiffslide"


def collect_slide_paths(inputs: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expand directories into the slide files they hold (one file per DICOM series folder);
    a file given twice is kept once; one path alone is taken as a list of one.

    Raises:
        ConfigError: a folder holds no slide file (a mistyped data folder is not a success).
    """
    paths: list[Path] = []
    for item in one_or_many(inputs):
        item = Path(item)
        if not item.is_dir():
            paths.append(item)
            continue
        dicom_dirs: set[Path] = set()
        found = 0
        for p in sorted(item.rglob("*")):
            if not p.is_file() or p.suffix.lower() not in SLIDE_SUFFIXES:
                continue
            found += 1
            if p.suffix.lower() == ".dcm":
                if p.parent in dicom_dirs:
                    continue
                dicom_dirs.add(p.parent)
            paths.append(p)
        if not found:
            raise ConfigError(
                f"{item}: no slide files in this folder or below it (looked for "
                f"{', '.join(sorted(SLIDE_SUFFIXES))}); check the path"
            )
    unique = {p.resolve(): p for p in reversed(paths)}  # first spelling of each file kept
    return [p for p in paths if unique.get(p.resolve()) is p]


def slide_fingerprint(path: Path) -> str:
    """The content fingerprint of the slide at ``path`` (`wsi_ssl.storage.fingerprint_file`).

    A DICOM slide is its series: a folder of instances, or a ``.dcm`` file and the instances
    of its series beside it, fingerprinted together (the sorted fingerprints of its files,
    so renaming a file keeps the id and changing any instance changes it). A series of one
    file, and every other slide, is its file's own fingerprint.
    """
    if not path.exists():
        raise SlideNotFoundError(path)
    files = series_files(path) if path.is_dir() or path.suffix.lower() == ".dcm" else [path]
    if not files:
        raise SlideNotFoundError(
            path,
            "a folder without a DICOM series (.dcm instances); one slide is a file or a DICOM "
            "series' folder: to tile every slide in a folder use tile_slides",
        )
    if len(files) == 1:
        return fingerprint_file(files[0])
    digest = hashlib.sha256(b"dicom-series")
    for fingerprint in sorted(fingerprint_file(f) for f in files):
        digest.update(bytes.fromhex(fingerprint))
    return digest.hexdigest()


def holds_slide(path: Path, fingerprint: str) -> bool:
    """Whether ``path`` (a slide file or DICOM series) still holds the slide fingerprinted as
    ``fingerprint`` (:func:`slide_fingerprint`); False when it is gone, unreadable or changed."""
    try:
        return slide_fingerprint(path) == fingerprint
    except (WsiSslError, OSError):
        return False


def thumbnail_and_mask(
    reader: SlideReader, slide_mpp: float, thumbnail_mpp: float
) -> tuple[np.ndarray, np.ndarray]:
    """The slide's thumbnail (at ``thumbnail_mpp``, at most ``THUMBNAIL_MAX_SIDE`` px) and its
    tissue mask; a level without a usable pyramid is read by blocks, in bounded memory."""
    w, h = reader.dimensions
    factor = min(slide_mpp / thumbnail_mpp, THUMBNAIL_MAX_SIDE / max(w, h))
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    thumbnail = reader.get_thumbnail(size)
    level0_per_px = w / thumbnail.shape[1]
    return thumbnail, detect_tissue(thumbnail, mpp=slide_mpp * level0_per_px)


def open_for_tiling(path: Path, mpp_override: float | None) -> SlideReader:
    """The registry's reader, or tiffslide where it reads the same pyramid faster.

    tiffslide decodes a tiled TIFF's tiles with libjpeg-turbo straight from the file, several
    times faster than openslide (benchmarks/RESULTS.md); it is used when the registry's reader is
    another backend, the file is tiled, and both report the same levels and scale. Anything
    else (NDPI, DICOM, MRXS, disagreeing pyramids) keeps the registry's choice.
    """
    reader = open_slide(path, mpp_override=mpp_override)
    if reader.backend == FAST_BACKEND:
        return reader
    try:
        fast = open_slide(path, mpp_override=mpp_override, backend=FAST_BACKEND)
    except WsiSslError:
        return reader
    same = fast.level_dimensions == reader.level_dimensions and fast.mpp == reader.mpp
    if same and getattr(fast, "tiled", False):
        reader.close()
        return fast
    fast.close()
    return reader


class SlideSource:
    """One slide, read once for every scale a job tiles from it.

    The fingerprint is taken on construction; the reader, the slide's scale, the thumbnail and
    the tissue mask on first use, then shared (a multi-scale job opens the slide and detects
    its tissue once). Close it, or use it as a context manager.

    Raises:
        SlideNotFoundError: no such file or folder.
    """

    def __init__(self, path: str | Path, mpp_override: float | None, thumbnail_mpp: float):
        self.path = Path(path)
        self.fingerprint = slide_fingerprint(self.path)
        self.slide_id = slide_id_from_fingerprint(self.fingerprint)
        self.mpp_override = mpp_override
        self.thumbnail_mpp = thumbnail_mpp
        self._reader: SlideReader | None = None
        self._thumbnail_and_mask: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def reader(self) -> SlideReader:
        """The open slide (:func:`open_for_tiling`), opened on first use."""
        if self._reader is None:
            self._reader = open_for_tiling(self.path, self.mpp_override)
        return self._reader

    def slide_mpp(self) -> float:
        """The slide's level-0 microns per pixel; undecodable pixels fail first, before a
        missing scale (``CorruptSlideError`` rather than ``MissingMppError``)."""
        if self.reader.mpp is None:
            self.reader.get_thumbnail((64, 64))
        return self.reader.require_mpp()

    def thumbnail_and_mask(self) -> tuple[np.ndarray, np.ndarray]:
        """The thumbnail at ``thumbnail_mpp`` and its tissue mask, made once."""
        if self._thumbnail_and_mask is None:
            self._thumbnail_and_mask = thumbnail_and_mask(
                self.reader, self.slide_mpp(), self.thumbnail_mpp
            )
        return self._thumbnail_and_mask

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> SlideSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
