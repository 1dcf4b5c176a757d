"""Pictures of a mask on its thumbnail: the tissue tint (:func:`mask_overlay`) and what tiling
kept and dropped (:func:`coverage_overlay`, the tissue picture ``wsi_ssl.tiling.qc`` saves)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from wsi_ssl.tissue.tiles import tile_cover

__all__ = ["DROPPED", "OUTSIDE_ROI", "ROI_OUTLINE", "coverage_overlay", "mask_overlay"]

DROPPED = (255, 0, 0)
"""Tissue (inside the ROI, if any) that no kept tile covers."""
OUTSIDE_ROI = (150, 150, 150)
"""Tissue outside the ROI: not asked for."""
ROI_OUTLINE = (255, 210, 0)
"""The ROI's edge."""


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


def coverage_overlay(
    thumbnail: np.ndarray,
    mask: np.ndarray,
    coords: np.ndarray,
    tile_size_level0: float,
    level0_per_px: float,
    region: np.ndarray | None = None,
) -> np.ndarray:
    """The thumbnail with kept tiles tinted blue and tissue that no kept tile covers in red:
    what tiling dropped, at a glance. With ``region`` (bool, the mask's shape: a ROI), tissue
    outside it is greyed, not red (it was not asked for), and the region is outlined in
    yellow.

    Returns:
        uint8 RGB (h, w, 3), a new array.
    """
    cover = tile_cover(mask.shape, coords, tile_size_level0, level0_per_px)
    out = mask_overlay(thumbnail, cover, color=(0, 90, 255), alpha=0.2)
    wanted = mask if region is None else mask & region
    out[wanted & ~cover] = DROPPED
    if region is not None:
        out[mask & ~region & ~cover] = OUTSIDE_ROI
        out[region & ~ndi.binary_erosion(region, border_value=1)] = ROI_OUTLINE
    return out
