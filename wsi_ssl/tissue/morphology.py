"""Binary morphology and thresholds of the tissue detector: Otsu levels, hysteresis, disk
dilation/erosion/closing/opening, hole filling and component filters (scipy.ndimage labels)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu


def otsu(levels: np.ndarray) -> int:
    """Otsu's threshold of 8-bit levels: pixels above it are the brighter class."""
    counts = np.bincount(levels, minlength=256)
    if np.count_nonzero(counts) < 2:
        return int(levels[0])
    return int(threshold_otsu(hist=(counts, np.arange(256))))


def hysteresis(weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Components of ``weak`` (8-connected) that hold at least one ``strong`` pixel."""
    labels, n = ndi.label(weak, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return weak
    hit = np.zeros(n + 1, dtype=bool)
    hit[labels[strong & weak]] = True
    hit[0] = False
    return np.take(hit, labels)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
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


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a disk; outside the image counts as foreground."""
    return ~dilate(~mask, radius)


def closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Closing by a disk; the image edge neither adds tissue nor erodes it."""
    return erode(dilate(mask, radius), radius)


def opening(mask: np.ndarray, radius: int) -> np.ndarray:
    """Opening by a disk; tissue cut by the image edge is not eroded from the edge."""
    return dilate(erode(mask, radius), radius)


def fill_holes(mask: np.ndarray, max_area_px: float, keep_out: np.ndarray) -> np.ndarray:
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


def drop_halos(mask: np.ndarray, halo: np.ndarray) -> np.ndarray:
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


def drop_small(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Remove tissue components smaller than an area."""
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_area_px
    keep[0] = False
    return np.take(keep, labels)
