"""Tissue masks of H&E slide thumbnails and the tissue fraction of each tile.

The detector follows the saturation-threshold recipe of CLAM (Lu et al., 2021): glass is
grey-white and stained tissue is coloured, so Otsu's threshold (Otsu, 1979) on HSV saturation
separates them. Marker ink is coloured too, so it is rejected first by hue rules in the spirit
of histolab's pen filters (H&E is pink to purple; ink is green, blue, or a saturated or dark
red), and black scanner borders by their value. Every size is physical (µm, µm²), so one
:class:`TissueParams` works at any thumbnail scale.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from wsi_ssl.errors import ConfigError

__all__ = [
    "TissueParams",
    "colour_cells",
    "colour_rules",
    "coverage_overlay",
    "detect_tissue",
    "mask_overlay",
    "tile_cover",
    "tissue_fraction",
]


@dataclass(frozen=True)
class TissueParams:
    """How :func:`detect_tissue` separates stained tissue from glass, ink and borders.

    Saturation, value and hue are HSV components: saturation and value in [0, 1], hue in
    degrees [0, 360) (0 red, 120 green, 240 blue, 300 magenta).

    Attributes:
        smoothing_radius_um: colours are box-averaged over a square of this half-width
            first, so pixel noise of fine images does not pass the threshold (a no-op at
            scales of twice this many µm/px or coarser).
        saturation_floor: the Otsu threshold is raised to at least this, so the JPEG noise of
            blank glass never becomes tissue.
        saturation_ceiling: the Otsu threshold is lowered to at most this, so an image that is
            all tissue is not split between pale eosin and dark hematoxylin.
        weak_saturation_ratio: hysteresis (Canny, 1986): pixels above this fraction of the
            threshold (and above ``weak_saturation_floor``) are tissue too where they touch
            tissue above the threshold: faint edges and thin, pale strands.
        weak_saturation_floor: the weak threshold is at least this (above glass noise).
        closing_radius_um: disk radius of the closing that joins nuclei and fibres into one
            tissue region (two thumbnail pixels at 8 µm/px).
        opening_radius_um: disk radius of an opening that then removes thin structures; 0
            (default) keeps thin strands of tissue; specks go by ``min_tissue_area_um2``.
        max_hole_area_um2: enclosed background up to this area (fat cells, small lumina,
            ≈ 160 µm across) is filled as tissue; larger holes stay background.
        min_tissue_area_um2: connected tissue smaller than this (≈ 50 µm square, a few
            thumbnail pixels at 8 µm/px) is dropped as dust; small fragments of tissue stay.
        black_value_max: pixels darker than this value are never tissue (scanner borders, ink).
        dark_value_max: with ``dark_saturation_max``: dark and nearly grey pixels are not
            tissue (grey borders, black ink); dark nuclei are saturated purple and stay.
        dark_saturation_max: see ``dark_value_max``.
        reject_pen: whether to reject marker ink with the rules below.
        pen_min_width_um: ink at least this wide is a pen stroke (narrower ink-coloured
            specks are blood or dye and only their own pixels are removed).
        pen_margin_um: strokes are grown by this margin before removal: a stroke's blurred
            rim is pink or purple like H&E and passes the hue rules.
        pen_hue_range: hues of green and blue ink, degrees; H&E has none of them.
        pen_saturation_min: minimum saturation of green and blue ink.
        red_pen_hue_range: hues of red ink, degrees, wrapping through 0; eosin sits at
            320-345, just below it.
        red_pen_saturation_min: minimum saturation of red ink; eosin is paler.
        dark_red_pen_value_max: red-hued pixels darker than this and at least
            ``pen_saturation_min`` saturated are dried red ink; hematoxylin is purple.
        dark_red_pen_hue_range: hues of dark red ink, degrees, wrapping through 0.
    """

    smoothing_radius_um: float = 4.0
    saturation_floor: float = 0.07
    saturation_ceiling: float = 0.2
    weak_saturation_ratio: float = 0.75
    weak_saturation_floor: float = 0.05
    closing_radius_um: float = 16.0
    opening_radius_um: float = 0.0
    max_hole_area_um2: float = 20_000.0
    min_tissue_area_um2: float = 2_500.0
    black_value_max: float = 0.15
    dark_value_max: float = 0.5
    dark_saturation_max: float = 0.2
    reject_pen: bool = True
    pen_min_width_um: float = 100.0
    pen_margin_um: float = 75.0
    pen_hue_range: tuple[float, float] = (70.0, 250.0)
    pen_saturation_min: float = 0.25
    red_pen_hue_range: tuple[float, float] = (345.0, 20.0)
    red_pen_saturation_min: float = 0.55
    dark_red_pen_value_max: float = 0.45
    dark_red_pen_hue_range: tuple[float, float] = (330.0, 20.0)

    def __post_init__(self) -> None:
        unit = (
            "saturation_floor",
            "saturation_ceiling",
            "weak_saturation_ratio",
            "weak_saturation_floor",
            "black_value_max",
            "dark_value_max",
            "dark_saturation_max",
            "pen_saturation_min",
            "red_pen_saturation_min",
            "dark_red_pen_value_max",
        )
        for name in unit:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.saturation_floor > self.saturation_ceiling:
            raise ConfigError(
                f"saturation_floor ({self.saturation_floor}) must not exceed "
                f"saturation_ceiling ({self.saturation_ceiling})"
            )
        sizes = (
            "smoothing_radius_um",
            "closing_radius_um",
            "opening_radius_um",
            "max_hole_area_um2",
            "min_tissue_area_um2",
            "pen_min_width_um",
            "pen_margin_um",
        )
        for name in sizes:
            if not getattr(self, name) >= 0.0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("pen_hue_range", "red_pen_hue_range", "dark_red_pen_hue_range"):
            if not all(0.0 <= h <= 360.0 for h in getattr(self, name)):
                raise ConfigError(
                    f"{name} must hold two hues in [0, 360], got {getattr(self, name)}"
                )


def detect_tissue(
    thumbnail: np.ndarray, mpp: float, params: TissueParams = TissueParams()
) -> np.ndarray:
    """Tissue mask of an H&E thumbnail.

    Steps: classify each colour as stain, dark (black or dark grey) or ink (hue rules); grow
    ink strokes at least ``pen_min_width_um`` wide by ``pen_margin_um``; threshold the 8-bit
    HSV saturation of the remaining pixels at Otsu's value (Otsu, 1979), clamped to
    ``[saturation_floor, saturation_ceiling]``, with hysteresis down to
    ``weak_saturation_ratio`` of it for pixels connected to tissue; closing (then opening, if
    asked) with disks; remove ink; fill small holes; drop small components. Morphology and areas use ``mpp``, so the result
    does not depend on the thumbnail's scale.

    Args:
        thumbnail: uint8 RGB image (h, w, 3).
        mpp: microns per thumbnail pixel.
        params: detection settings.

    Returns:
        bool (h, w), True on tissue.

    Raises:
        ValueError: ``thumbnail`` is not uint8 (h, w, 3) or ``mpp`` is not positive.
    """
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or thumbnail.dtype != np.uint8:
        raise ValueError(
            f"thumbnail must be uint8 RGB (h, w, 3), got {thumbnail.dtype} {thumbnail.shape}"
        )
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    smooth = round(params.smoothing_radius_um / mpp)
    if smooth >= 1:
        thumbnail = ndi.uniform_filter(thumbnail, size=(2 * smooth + 1, 2 * smooth + 1, 1))
    r, g, b = np.moveaxis(thumbnail, -1, 0)
    value = np.maximum(np.maximum(r, g), b)
    chroma = value - np.minimum(np.minimum(r, g), b)
    saturation = np.divide(chroma, np.maximum(value, 1), dtype=np.float32)
    saturation = (saturation * 255 + 0.5).astype(np.uint8)  # 8-bit levels, like value

    index = (r >> _DROP).astype(np.uint16) << 2 * _BITS
    index |= (g >> _DROP).astype(np.uint16) << _BITS
    index |= b >> _DROP
    colour = np.take(_colour_table(params), index)
    blocked = colour != _STAIN
    ink = colour == _INK
    if ink.any():
        # strokes: where a disk of half the stroke width fits in the ink; grown back and on
        # by the margin (an opening followed by a dilation, in two passes)
        core = round(params.pen_min_width_um / 2 / mpp)
        grown = round((params.pen_min_width_um / 2 + params.pen_margin_um) / mpp)
        ink |= _dilate(_erode(ink, core), grown)
        blocked |= ink
    stained = saturation[~blocked]
    if stained.size == 0:
        return np.zeros_like(blocked)
    floor, ceiling = (round(255 * params.saturation_floor), round(255 * params.saturation_ceiling))
    threshold = min(max(_otsu(stained), floor), ceiling)
    weak = max(threshold * params.weak_saturation_ratio, 255 * params.weak_saturation_floor)
    mask = _hysteresis(saturation > weak, saturation > threshold) & ~blocked

    mask = _closing(mask, round(params.closing_radius_um / mpp)) & ~ink
    mask = _opening(mask, round(params.opening_radius_um / mpp))
    if ink.any():
        halo = _dilate(ink, round(params.pen_margin_um / mpp)) & ~ink
        mask = _drop_halos(mask, halo)
    # components are labelled within the tissue's bounding box only: everything outside it
    # is background connected to the image edge
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return mask
    box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    area_px = mpp * mpp
    tissue = _fill_holes(mask[box], params.max_hole_area_um2 / area_px, keep_out=ink[box])
    mask[box] = _drop_small(tissue, params.min_tissue_area_um2 / area_px)
    return mask


def tissue_fraction(
    mask: np.ndarray, coords: np.ndarray, tile_size_level0: float, level0_per_mask_px: float
) -> np.ndarray:
    """Fraction of each tile's square that is tissue on the mask raster.

    A tile covers level-0 ``[x, x + tile_size_level0)``; on the mask that is pixel columns
    ``floor(x / s)`` to ``ceil((x + tile_size_level0) / s)`` (``s = level0_per_mask_px``),
    every mask pixel the tile touches, and likewise for rows. Tissue pixels in that box are
    counted with a summed-area table (Crow, 1984) in O(1) per tile; the part of the box
    outside the mask counts as background.

    Args:
        mask: bool (h, w) tissue mask.
        coords: int64 (N, 2) level-0 (x, y) of each tile's top-left corner.
        tile_size_level0: tile edge in level-0 pixels.
        level0_per_mask_px: level-0 pixels per mask pixel.

    Returns:
        float32 (N,) in [0, 1].

    Raises:
        ValueError: wrong array shapes, or a size that is not positive.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2), got shape {coords.shape}")
    if not (tile_size_level0 > 0 and level0_per_mask_px > 0):
        raise ValueError(
            f"tile_size_level0 ({tile_size_level0}) and level0_per_mask_px "
            f"({level0_per_mask_px}) must be > 0"
        )
    h, w = mask.shape
    table = np.zeros((h + 1, w + 1), dtype=np.int64)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1, out=table[1:, 1:])

    start = np.floor(coords / level0_per_mask_px).astype(np.int64)
    stop = np.ceil((coords + tile_size_level0) / level0_per_mask_px).astype(np.int64)
    x0, x1 = np.clip(start[:, 0], 0, w), np.clip(stop[:, 0], 0, w)
    y0, y1 = np.clip(start[:, 1], 0, h), np.clip(stop[:, 1], 0, h)
    tissue = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    box = (stop[:, 0] - start[:, 0]) * (stop[:, 1] - start[:, 1])
    return (tissue / box).astype(np.float32)


def mask_overlay(
    thumbnail: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int] = (0, 90, 255),
    alpha: float = 0.25,
) -> np.ndarray:
    """The thumbnail with tissue tinted and outlined, for figures and reports.

    Args:
        thumbnail: uint8 RGB (h, w, 3).
        mask: bool (h, w) at the thumbnail's scale.
        color: RGB of the tint and the outline (blue by default: H&E has none).
        alpha: tint opacity inside the mask; the one-pixel outline is opaque.

    Returns:
        uint8 RGB (h, w, 3), a new array.

    Raises:
        ValueError: the mask and thumbnail shapes disagree.
    """
    if thumbnail.ndim != 3 or mask.dtype != bool or mask.shape != thumbnail.shape[:2]:
        raise ValueError(
            f"mask must be bool with the thumbnail's (h, w); got {mask.dtype} {mask.shape} "
            f"for a thumbnail of shape {thumbnail.shape}"
        )
    tint = np.asarray(color, dtype=np.float32)
    out = thumbnail.astype(np.float32)
    out[mask] += alpha * (tint - out[mask])
    outline = mask & ~ndi.binary_erosion(mask, border_value=1)
    out[outline] = tint
    return out.round().astype(np.uint8)


def colour_cells(image: np.ndarray) -> np.ndarray:
    """uint16 index of each pixel's RGB cell (5 bits a channel), into :func:`colour_rules`."""
    r, g, b = (image[..., i] >> _DROP for i in range(3))
    return (r.astype(np.uint16) << 2 * _BITS) | (g.astype(np.uint16) << _BITS) | b


def colour_rules(params: TissueParams = TissueParams()) -> tuple[np.ndarray, np.ndarray]:
    """Per RGB cell of :func:`colour_cells`: marker ink (hue rules) and dark grey/black, the
    colour rules of :func:`detect_tissue` without the stroke width and margin.

    Returns:
        (ink, dark), two bool (32768,) tables.
    """
    table = _colour_table(params)
    return table == _INK, table == _DARK


def tile_cover(
    shape: tuple[int, int], coords: np.ndarray, tile_size_level0: float, level0_per_px: float
) -> np.ndarray:
    """The pixels of an (h, w) raster that the tiles at ``coords`` cover.

    A raster pixel is covered when its centre lies in a tile's level-0 square
    ``[x, x + tile_size_level0)``; ``level0_per_px`` is level-0 pixels per raster pixel.

    Returns:
        bool (h, w).
    """
    h, w = shape
    cover = np.zeros((h + 1, w + 1), dtype=np.int32)
    start = np.ceil(coords / level0_per_px - 0.5).astype(np.int64)
    stop = np.ceil((coords + tile_size_level0) / level0_per_px - 0.5).astype(np.int64)
    x0, x1 = np.clip(start[:, 0], 0, w), np.clip(stop[:, 0], 0, w)
    y0, y1 = np.clip(start[:, 1], 0, h), np.clip(stop[:, 1], 0, h)
    # each tile adds +1 inside its box, through the four corners of a difference table
    np.add.at(cover, (y0, x0), 1)
    np.add.at(cover, (y0, x1), -1)
    np.add.at(cover, (y1, x0), -1)
    np.add.at(cover, (y1, x1), 1)
    return np.cumsum(np.cumsum(cover, axis=0), axis=1)[:h, :w] > 0


def coverage_overlay(
    thumbnail: np.ndarray,
    mask: np.ndarray,
    coords: np.ndarray,
    tile_size_level0: float,
    level0_per_px: float,
) -> np.ndarray:
    """The thumbnail with kept tiles tinted blue and tissue that no kept tile covers in red:
    what tiling dropped, at a glance.

    Returns:
        uint8 RGB (h, w, 3), a new array.
    """
    cover = tile_cover(mask.shape, coords, tile_size_level0, level0_per_px)
    out = mask_overlay(thumbnail, cover, color=(0, 90, 255), alpha=0.2)
    out[mask & ~cover] = (255, 0, 0)
    return out


_BITS = 5
"""Colour rules are looked up per RGB cell of this many bits per channel (32**3 cells)."""
_DROP = 8 - _BITS
_STAIN, _DARK, _INK = 0, 1, 2


@functools.lru_cache(maxsize=8)
def _colour_table(params: TissueParams) -> np.ndarray:
    """uint8 class (_STAIN, _DARK, _INK) of every RGB cell, judged at the cell's centre."""
    centre = (np.arange(2**_BITS) << _DROP) + (2**_DROP - 1) / 2
    r, g, b = (c.ravel() for c in np.meshgrid(centre, centre, centre, indexing="ij"))
    value = np.maximum(np.maximum(r, g), b)
    chroma = value - np.minimum(np.minimum(r, g), b)
    hue = _hue(r, g, b, value, chroma)
    sat = chroma / value
    value /= 255
    table = np.full(r.shape, _STAIN, dtype=np.uint8)
    dark = (value < params.black_value_max) | (
        (value < params.dark_value_max) & (sat < params.dark_saturation_max)
    )
    table[dark] = _DARK
    if params.reject_pen:
        green_blue = _in_hue_range(hue, params.pen_hue_range) & (sat >= params.pen_saturation_min)
        red = _in_hue_range(hue, params.red_pen_hue_range) & (sat >= params.red_pen_saturation_min)
        dark_red = (
            _in_hue_range(hue, params.dark_red_pen_hue_range)
            & (value < params.dark_red_pen_value_max)
            & (sat >= params.pen_saturation_min)
        )
        table[(green_blue | red | dark_red) & ~dark] = _INK
    return table


def _hue(
    r: np.ndarray, g: np.ndarray, b: np.ndarray, value: np.ndarray, chroma: np.ndarray
) -> np.ndarray:
    """HSV hue in degrees [0, 360); grey gets 0."""
    is_r, is_g = value == r, value == g
    sector = np.where(is_r, 0.0, np.where(is_g, 120.0, 240.0))
    rise = np.where(is_r, g - b, np.where(is_g, b - r, r - g))
    return np.mod(sector + 60.0 * rise / np.maximum(chroma, 1e-9), 360.0)


def _in_hue_range(hue: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Hue in [lo, hi), wrapping through 0 when lo > hi."""
    lo, hi = bounds
    if lo <= hi:
        return (hue >= lo) & (hue < hi)
    return (hue >= lo) | (hue < hi)


def _otsu(levels: np.ndarray) -> int:
    """Otsu's threshold of 8-bit levels: pixels above it are the brighter class."""
    counts = np.bincount(levels, minlength=256)
    if np.count_nonzero(counts) < 2:
        return int(levels[0])
    return int(threshold_otsu(hist=(counts, np.arange(256))))


def _hysteresis(weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Components of ``weak`` (8-connected) that hold at least one ``strong`` pixel."""
    labels, n = ndi.label(weak, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return weak
    hit = np.zeros(n + 1, dtype=bool)
    hit[labels[strong & weak]] = True
    hit[0] = False
    return np.take(hit, labels)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disk of ``radius`` pixels; outside the image is background.

    The disk is the union of the rectangles at the corners of its staircase edge: rows are
    dilated by each half-width in turn (shifted ORs), then shifted up and down by the
    half-height they belong to, so the cost grows with the radius, not its square.
    """
    if radius < 1 or not mask.any():
        return mask
    half = [math.isqrt(radius * radius - dy * dy) for dy in range(radius + 1)]
    rows = {0: mask}
    wide = mask.copy()
    for dx in range(1, half[0] + 1):
        wide[:, dx:] |= mask[:, :-dx]
        wide[:, :-dx] |= mask[:, dx:]
        if dx in half:
            rows[dx] = wide.copy()
    out = rows[half[0]].copy()
    for dy in range(1, radius + 1):
        row = rows[half[dy]]
        out[dy:] |= row[:-dy]
        out[:-dy] |= row[dy:]
    return out


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a disk; outside the image counts as foreground."""
    return ~_dilate(~mask, radius)


def _closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Closing by a disk; the image edge neither adds tissue nor erodes it."""
    return _erode(_dilate(mask, radius), radius)


def _opening(mask: np.ndarray, radius: int) -> np.ndarray:
    """Opening by a disk; tissue cut by the image edge is not eroded from the edge."""
    return _dilate(_erode(mask, radius), radius)


def _fill_holes(mask: np.ndarray, max_area_px: float, keep_out: np.ndarray) -> np.ndarray:
    """Fill background components that do not touch the edge, up to an area.

    Pixels in ``keep_out`` (ink) stay background even inside a filled hole.
    """
    labels, n = ndi.label(~mask)
    if n == 0:
        return mask
    area = np.bincount(labels.ravel(), minlength=n + 1)
    fill = area <= max_area_px
    fill[0] = False
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        fill[edge] = False
    return mask | (np.take(fill, labels) & ~keep_out)


def _drop_halos(mask: np.ndarray, halo: np.ndarray) -> np.ndarray:
    """Remove tissue components lying mostly (half or more) in the band around ink strokes:
    the blurred, pink rims of the ink, not tissue."""
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    area = np.bincount(labels.ravel(), minlength=n + 1)
    in_halo = np.bincount(labels[halo], minlength=n + 1)
    keep = in_halo * 2 < area
    keep[0] = False
    return np.take(keep, labels)


def _drop_small(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Remove tissue components smaller than an area."""
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_area_px
    keep[0] = False
    return np.take(keep, labels)
