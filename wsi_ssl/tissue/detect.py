"""The tissue detector: a saturation threshold (Otsu) on what the colour rules leave, cleaned up
by morphology at physical sizes."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from wsi_ssl.tissue.colours import INK, STAIN, colour_class
from wsi_ssl.tissue.morphology import (
    closing,
    dilate,
    drop_halos,
    drop_small,
    erode,
    fill_holes,
    hysteresis,
    opening,
    otsu,
)
from wsi_ssl.tissue.params import DEFAULT_PARAMS, TissueParams

__all__ = ["detect_tissue"]


def detect_tissue(
    thumbnail: np.ndarray, mpp: float, params: TissueParams = DEFAULT_PARAMS
) -> np.ndarray:
    """Tissue mask of an H&E thumbnail.

    Steps: classify each colour as stain, dark (black or dark grey) or ink (hue rules); grow
    ink strokes at least ``pen_min_width_um`` wide by ``pen_margin_um``; threshold the 8-bit
    HSV saturation of the remaining pixels at Otsu's value (Otsu, 1979), clamped to
    ``[saturation_floor, saturation_ceiling]``, with hysteresis down to
    ``weak_saturation_ratio`` of it for pixels connected to tissue; closing (then opening, if
    asked) with disks; remove ink; fill small holes; drop small components. Morphology and
    areas use ``mpp``, so the result does not depend on the thumbnail's scale.

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
    saturation = _saturation(thumbnail)
    colour = colour_class(thumbnail, params)
    ink = _pen_strokes(colour == INK, mpp, params)
    blocked = (colour != STAIN) | ink
    stained = saturation[~blocked]
    if stained.size == 0:
        return np.zeros_like(blocked)
    floor, ceiling = (round(255 * params.saturation_floor), round(255 * params.saturation_ceiling))
    threshold = min(max(otsu(stained), floor), ceiling)
    weak = max(threshold * params.weak_saturation_ratio, 255 * params.weak_saturation_floor)
    mask = hysteresis(saturation > weak, saturation > threshold) & ~blocked

    mask = closing(mask, round(params.closing_radius_um / mpp)) & ~ink
    mask = opening(mask, round(params.opening_radius_um / mpp))
    if ink.any():
        halo = dilate(ink, round(params.pen_margin_um / mpp)) & ~ink
        mask = drop_halos(mask, halo)
    # components are labelled within the tissue's bounding box only: everything outside it
    # is background connected to the image edge
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return mask
    box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    area_px = mpp * mpp
    tissue = fill_holes(mask[box], params.max_hole_area_um2 / area_px, keep_out=ink[box])
    mask[box] = drop_small(tissue, params.min_tissue_area_um2 / area_px)
    return mask


def _saturation(image: np.ndarray) -> np.ndarray:
    """HSV saturation of an RGB image in 8-bit levels (like value)."""
    r, g, b = np.moveaxis(image, -1, 0)
    value = np.maximum(np.maximum(r, g), b)
    chroma = value - np.minimum(np.minimum(r, g), b)
    saturation = np.divide(chroma, np.maximum(value, 1), dtype=np.float32)
    return (saturation * 255 + 0.5).astype(np.uint8)


def _pen_strokes(ink: np.ndarray, mpp: float, params: TissueParams) -> np.ndarray:
    """Ink pixels plus the strokes at least ``pen_min_width_um`` wide, grown by
    ``pen_margin_um``: where a disk of half the stroke width fits in the ink, grown back and
    on by the margin (an opening followed by a dilation, in two passes)."""
    if not ink.any():
        return ink
    core = round(params.pen_min_width_um / 2 / mpp)
    grown = round((params.pen_min_width_um / 2 + params.pen_margin_um) / mpp)
    return ink | dilate(erode(ink, core), grown)
