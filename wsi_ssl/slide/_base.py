"""The `SlideReader` protocol, the shared reader base class and the microns-per-pixel chain."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Protocol, Self, runtime_checkable

import numpy as np
import tifffile
from PIL import Image

from wsi_ssl.errors import ConfigError, CorruptSlideError, MissingMppError, SlideNotFoundError
from wsi_ssl.slide._stored import StoredTiles

__all__ = [
    "MPP_RANGE",
    "MPP_SOURCES",
    "BaseSlideReader",
    "SlideMetadata",
    "SlideReader",
    "implausible_mpp",
    "resolve_mpp",
    "state_mpp",
    "tiff_resolution_tags",
    "to_rgb",
]

THUMBNAIL_WHOLE_LEVEL_PIXELS = 6000 * 6000
"""Largest level a thumbnail reads in one piece (about 100 MB of RGB); larger ones by blocks."""
THUMBNAIL_BLOCK = 2048
"""Level pixels per side of one block read for a thumbnail of a large level."""

MPP_RANGE: tuple[float, float] = (0.01, 100.0)
"""Plausible microns per pixel; values outside (such as 72 dpi, 352.8) are ignored."""

_VENDOR_MPP_KEYS = ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP", "wsidicom.mpp-x")
_OBJECTIVE_KEYS = ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag")
_MICRONS_PER_UNIT = {"centimeter": 1e4, "inch": 25400.0}


@runtime_checkable
class SlideReader(Protocol):
    """A whole-slide image opened by one backend; mirrors openslide's API with numpy output.

    Coordinates: `location` is level-0 (x, y); `size` is (w, h) at the requested level.
    Pixels are RGB uint8 (h, w, 3); whatever lies outside the slide is white.
    """

    path: Path
    backend: ClassVar[str]
    vendor: str | None
    dimensions: tuple[int, int]
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]
    mpp: float | None
    mpp_source: str | None

    def require_mpp(self) -> float: ...

    def ignored_mpp(self) -> list[tuple[str, float]]: ...

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray: ...

    def get_thumbnail(self, max_size: tuple[int, int]) -> np.ndarray: ...

    def stored_tiles(self, level: int) -> StoredTiles | None: ...

    def best_level_for_downsample(self, downsample: float) -> int: ...

    def close(self) -> None: ...

    def __enter__(self) -> SlideReader: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _plausible(mpp: float | None) -> bool:
    return mpp is not None and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


@dataclass(frozen=True)
class _MppEvidence:
    """What the mpp chain may consult for one slide."""

    properties: Mapping[str, str]
    vendor: str | None
    override: float | None
    resolution_tags: Callable[[], Mapping[str, str]]


def _vendor_mpp(e: _MppEvidence) -> list[float | None]:
    # For generic TIFFs both backends derive *.mpp-x from the resolution tags: that is not a
    # vendor statement, so it is left to the "tiff-resolution" step.
    if e.vendor is None:
        return []
    return [_float(e.properties.get(key)) for key in _VENDOR_MPP_KEYS]


def _resolution_mpp(e: _MppEvidence) -> list[float | None]:
    tags = e.properties if "tiff.XResolution" in e.properties else e.resolution_tags()
    microns = _MICRONS_PER_UNIT.get(tags.get("tiff.ResolutionUnit", "").lower())
    resolution = _float(tags.get("tiff.XResolution"))
    return [microns / resolution] if microns and resolution else []


def _objective_mpp(e: _MppEvidence) -> list[float | None]:
    powers = (_float(e.properties.get(key)) for key in _OBJECTIVE_KEYS)
    return [10.0 / power for power in powers if power]


def _override_mpp(e: _MppEvidence) -> list[float | None]:
    return [e.override]


_MPP_CHAIN: tuple[tuple[str, Callable[[_MppEvidence], list[float | None]]], ...] = (
    ("vendor", _vendor_mpp),
    ("tiff-resolution", _resolution_mpp),
    ("objective-power", _objective_mpp),
    ("override", _override_mpp),
)

MPP_SOURCES: tuple[str, ...] = tuple(source for source, _ in _MPP_CHAIN)
"""Where a reader's mpp came from, in the order the chain tries them."""


def resolve_mpp(
    properties: Mapping[str, str],
    vendor: str | None,
    override: float | None = None,
    resolution_tags: Callable[[], Mapping[str, str]] = dict,
) -> tuple[float | None, str | None]:
    """Level-0 microns per pixel and its source, by the first plausible step of the chain.

    Steps, in the order of `MPP_SOURCES`: the vendor's mpp property; the TIFF resolution
    tags with a centimetre or inch unit (from `properties`, else from `resolution_tags()`);
    10 / objective power; the user's `override`. Values outside `MPP_RANGE` fall through.

    Args:
        properties: the backend's raw properties (string values).
        vendor: the normalised vendor, None for a generic TIFF.
        override: the user's mpp, used only when the slide records none.
        resolution_tags: called lazily for `tiff.*` resolution tags the backend did not expose.

    Returns:
        (mpp, source), or (None, None) when no step gives a plausible value.
    """
    evidence = _MppEvidence(properties, vendor, override, resolution_tags)
    for source, step in _MPP_CHAIN:
        for mpp in step(evidence):
            if _plausible(mpp):
                return mpp, source
    return None, None


_EVIDENCE_NAMES = {
    "vendor": "the vendor's mpp property gives",
    "tiff-resolution": "the TIFF resolution tags give",
    "objective-power": "the objective power gives",
}


def implausible_mpp(
    properties: Mapping[str, str],
    vendor: str | None,
    resolution_tags: Callable[[], Mapping[str, str]] = dict,
) -> list[tuple[str, float]]:
    """The scales the chain found and ignored as outside `MPP_RANGE`, as (source, mpp): a
    72 dpi placeholder in the TIFF resolution tags reads as 352.8 µm/px."""
    evidence = _MppEvidence(properties, vendor, None, resolution_tags)
    return [
        (source, mpp)
        for source, step in _MPP_CHAIN
        if source in _EVIDENCE_NAMES
        for mpp in step(evidence)
        if mpp is not None and not _plausible(mpp)
    ]


def _missing_mpp(path: Path, ignored: list[tuple[str, float]]) -> MissingMppError:
    """`MissingMppError` for ``path``; where the slide records a scale out of `MPP_RANGE`, its
    message says which and what value, rather than that it records none."""
    err = MissingMppError(path)
    if not ignored:
        return err
    found = []
    for source, mpp in ignored:
        per_inch = f" ({25400 / mpp:.4g} pixels per inch)" if source == "tiff-resolution" else ""
        found.append(f"{_EVIDENCE_NAMES[source]} {mpp:.5g} µm/px{per_inch}")
    advice = str(err).removeprefix(f"{path}: ").partition("; ")[2]
    err.args = (
        f"{path}: no plausible microns-per-pixel: {' and '.join(found)}, outside the "
        f"plausible {MPP_RANGE[0]}-{MPP_RANGE[1]:g} µm/px, and nothing else records one; {advice}",
    )
    return err


def state_mpp(reader: SlideReader, mpp: float, how: str = "table") -> tuple[float | None, str]:
    """Make ``mpp`` the scale of the open ``reader``, as a per-slide table states it: it wins
    over the scale the file records. Returns the scale it replaced and its source; for a
    file that records none (or an override in its place) the stated scale is an override and
    is recorded so (``mpp_source`` "override"), else as ``how``.

    Raises:
        ConfigError: ``mpp`` is outside `MPP_RANGE`.
    """
    if not _plausible(mpp):
        raise ConfigError(
            f"{reader.path}: the {how}'s mpp {mpp:g} must be in [{MPP_RANGE[0]}, "
            f"{MPP_RANGE[1]}] µm/px"
        )
    replaced = (reader.mpp, reader.mpp_source or "none")
    if reader.mpp_source in (None, "override"):
        reader.mpp, reader.mpp_source = mpp, "override"
    else:
        reader.mpp, reader.mpp_source = mpp, how
    return replaced


def tiff_resolution_tags(path: Path) -> dict[str, str]:
    """The first page's resolution tags as `tiff.*` properties; empty when not a TIFF."""
    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages.first.tags
            unit = tags.get("ResolutionUnit")
            xres = tags.get("XResolution")
            if unit is None or xres is None:
                return {}
            numerator, denominator = xres.value
            return {
                "tiff.ResolutionUnit": tifffile.RESUNIT(unit.value).name.lower(),
                "tiff.XResolution": str(numerator / denominator) if denominator else "0",
            }
    except (tifffile.TiffFileError, OSError, ValueError):
        return {}


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if np.issubdtype(pixels.dtype, np.integer):
        scaled = pixels.astype(np.float32) * (255.0 / np.iinfo(pixels.dtype).max)
    else:
        scaled = pixels.astype(np.float32) * 255.0
    return (np.clip(scaled, 0.0, 255.0) + 0.5).astype(np.uint8)


def to_rgb(pixels: np.ndarray, *, alpha: bool = False) -> np.ndarray:
    """RGB uint8 (h, w, 3), C-contiguous, from any (h, w) or (h, w, c) array.

    Non-uint8 integers are scaled by their dtype's maximum, floats from [0, 1]. With `alpha`,
    a fourth channel is straight alpha and is composited over white. Otherwise one channel is
    grey, two get a zero third channel, and more keep the first three (a false-colour
    composite of fluorescence channels).
    """
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    pixels = _to_uint8(pixels)
    channels = pixels.shape[2]
    if alpha and channels == 4:
        if pixels[..., 3].min() == 255:  # opaque, the common case: no compositing
            return np.ascontiguousarray(pixels[..., :3])
        a = pixels[..., 3:4].astype(np.uint16)
        rgb = pixels[..., :3].astype(np.uint16) * a + 255 * (255 - a)
        return ((rgb + 127) // 255).astype(np.uint8)
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    if channels == 2:
        return np.concatenate([pixels, np.zeros_like(pixels[..., :1])], axis=2)
    return np.ascontiguousarray(pixels[..., :3])


@dataclass(frozen=True)
class SlideMetadata:
    """What a backend reports when it opens a slide."""

    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]
    vendor: str | None


class BaseSlideReader(ABC):
    """Shared behaviour of every backend: mpp chain, clipping and white padding, thumbnails.

    A backend implements `_open` (raising `UnsupportedSlideError` when it cannot), `_read`
    (a region wholly inside a level) and `_close`, and lists in `_decode_errors` what its
    library raises on undecodable pixels.
    """

    backend: ClassVar[str]
    _decode_errors: ClassVar[tuple[type[Exception], ...]]

    def __init__(self, path: str | Path, *, mpp_override: float | None = None) -> None:
        """Open `path`.

        Args:
            path: the slide file.
            mpp_override: microns per pixel to use when the slide records none.

        Raises:
            SlideNotFoundError: no such file.
            UnsupportedSlideError: this backend cannot open it.
            ConfigError: `mpp_override` is outside `MPP_RANGE`.
        """
        if mpp_override is not None and not _plausible(mpp_override):
            raise ConfigError(
                f"mpp_override must be in [{MPP_RANGE[0]}, {MPP_RANGE[1]}] µm/px, "
                f"got {mpp_override}"
            )
        self.path = Path(path)
        if not self.path.exists():
            raise SlideNotFoundError(self.path)
        meta = self._open()
        self._closed = False
        self.vendor = meta.vendor
        self.properties = meta.properties
        self.level_dimensions = meta.level_dimensions
        self.level_downsamples = meta.level_downsamples
        self.level_count = len(meta.level_dimensions)
        self.dimensions = meta.level_dimensions[0]
        self.mpp, self.mpp_source = resolve_mpp(
            meta.properties, meta.vendor, mpp_override, self._resolution_tags
        )

    @abstractmethod
    def _open(self) -> SlideMetadata:
        """Open `self.path` with the backend and report its geometry and properties."""

    @abstractmethod
    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """A region lying inside the level, as RGB uint8 (h, w, 3)."""

    @abstractmethod
    def _close(self) -> None:
        """Release the backend's handle."""

    def _resolution_tags(self) -> Mapping[str, str]:
        """`tiff.*` resolution tags the backend does not expose itself (none by default)."""
        return {}

    def require_mpp(self) -> float:
        """The slide's mpp, or `MissingMppError` naming the override options."""
        if self.mpp is None:
            raise _missing_mpp(self.path, self.ignored_mpp())
        return self.mpp

    def ignored_mpp(self) -> list[tuple[str, float]]:
        """The scales the slide records that were ignored as implausible (`implausible_mpp`)."""
        return implausible_mpp(self.properties, self.vendor, self._resolution_tags)

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read pixels as RGB uint8 (h, w, 3); what lies outside the slide is white.

        Args:
            location: level-0 (x, y) of the region's top-left corner.
            level: pyramid level to read from.
            size: (w, h) of the region at `level`.

        Raises:
            ValueError: `level` or `size` is invalid.
            CorruptSlideError: the backend cannot decode the pixels.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"level must be in [0, {self.level_count - 1}], got {level}")
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        if w < 0 or h < 0:
            raise ValueError(f"size must be non-negative, got {size}")
        canvas = np.full((h, w, 3), 255, dtype=np.uint8)
        downsample = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        lx, ly = x / downsample, y / downsample  # the region's origin in level pixels
        eps = 1e-6
        i0, j0 = max(0, math.ceil(-lx - eps)), max(0, math.ceil(-ly - eps))
        i1 = min(w, math.floor(level_w - lx + eps))
        j1 = min(h, math.floor(level_h - ly + eps))
        if i0 >= i1 or j0 >= j1:
            return canvas
        inner = (max(0, round(x + i0 * downsample)), max(0, round(y + j0 * downsample)))
        try:
            pixels = self._read(inner, level, (i1 - i0, j1 - j0))
        except CorruptSlideError:  # already says what is wrong (an OSError too)
            raise
        except self._decode_errors as err:
            raise CorruptSlideError(self.path, f"{type(err).__name__}: {err}") from err
        canvas[j0:j1, i0:i1] = pixels
        return canvas

    def stored_tiles(self, level: int) -> StoredTiles | None:
        """The level's stored tiles for direct reads, where the backend exposes them."""
        return None

    def get_thumbnail(self, max_size: tuple[int, int]) -> np.ndarray:
        """The whole slide as RGB uint8, fitting in `max_size` (w, h), aspect preserved.

        Read from the coarsest level at least as fine as needed, then resized; never
        enlarged beyond level 0. A level of more than `THUMBNAIL_WHOLE_LEVEL_PIXELS` (a slide
        without a usable pyramid) is read and area-averaged block by block, so memory stays
        bounded by a block whatever the level's size.
        """
        w, h = self.dimensions
        scale = min(max_size[0] / w, max_size[1] / h, 1.0)
        out = (max(1, round(w * scale)), max(1, round(h * scale)))
        level = self.best_level_for_downsample(1.0 / scale)
        level_w, level_h = self.level_dimensions[level]
        if level_w * level_h > THUMBNAIL_WHOLE_LEVEL_PIXELS:
            return self._thumbnail_by_blocks(level, out)
        pixels = self.read_region((0, 0), level, self.level_dimensions[level])
        if pixels.shape[1::-1] == out:
            return pixels
        resized = Image.fromarray(pixels).resize(out, Image.Resampling.LANCZOS)
        return np.array(resized)

    def _thumbnail_by_blocks(self, level: int, out: tuple[int, int]) -> np.ndarray:
        """Level ``level`` shrunk to ``out`` (w, h): blocks of at most about
        `THUMBNAIL_BLOCK` level pixels a side are read and box-averaged one at a time."""
        level_w, level_h = self.level_dimensions[level]
        downsample = self.level_downsamples[level]
        fx, fy = level_w / out[0], level_h / out[1]  # level pixels per thumbnail pixel
        step_x = max(1, int(THUMBNAIL_BLOCK // fx))  # thumbnail pixels per block
        step_y = max(1, int(THUMBNAIL_BLOCK // fy))
        thumbnail = np.empty((out[1], out[0], 3), dtype=np.uint8)
        for j0 in range(0, out[1], step_y):
            j1 = min(out[1], j0 + step_y)
            y0, y1 = round(j0 * fy), round(j1 * fy)
            for i0 in range(0, out[0], step_x):
                i1 = min(out[0], i0 + step_x)
                x0, x1 = round(i0 * fx), round(i1 * fx)
                origin = (round(x0 * downsample), round(y0 * downsample))
                block = self.read_region(origin, level, (x1 - x0, y1 - y0))
                shrunk = Image.fromarray(block).resize((i1 - i0, j1 - j0), Image.Resampling.BOX)
                thumbnail[j0:j1, i0:i1] = np.asarray(shrunk)
        return thumbnail

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most `downsample` (0.1 % tolerance)."""
        limit = downsample * (1 + 1e-3)
        return max(
            (i for i, ds in enumerate(self.level_downsamples) if ds <= limit),
            default=0,
        )

    def close(self) -> None:
        """Release the backend's handle; further calls do nothing."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = "None" if self.mpp is None else f"{self.mpp:g} ({self.mpp_source})"
        return (
            f"{type(self).__name__}({str(self.path)!r}, vendor={self.vendor!r}, "
            f"{w}x{h}, levels={self.level_count}, mpp={mpp})"
        )
