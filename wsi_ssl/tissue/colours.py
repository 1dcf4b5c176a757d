"""Colour rules: every RGB cell (5 bits a channel) classed as stain, dark (black or grey) or
marker ink by hue, saturation and value, looked up from one table per :class:`TissueParams`."""

from __future__ import annotations

import functools

import numpy as np

from wsi_ssl.tissue.params import DEFAULT_PARAMS, TissueParams

__all__ = ["DARK", "INK", "STAIN", "colour_cells", "colour_class", "colour_rules"]

BITS = 5
"""Colour rules are looked up per RGB cell of this many bits per channel (32**3 cells)."""
DROP = 8 - BITS
STAIN, DARK, INK = 0, 1, 2


def colour_cells(image: np.ndarray) -> np.ndarray:
    """uint16 index of each pixel's RGB cell (5 bits a channel), into :func:`colour_rules`."""
    r, g, b = (image[..., i] >> DROP for i in range(3))
    return (r.astype(np.uint16) << 2 * BITS) | (g.astype(np.uint16) << BITS) | b


def colour_rules(params: TissueParams = DEFAULT_PARAMS) -> tuple[np.ndarray, np.ndarray]:
    """Per RGB cell of :func:`colour_cells`: marker ink (hue rules) and dark grey/black, the
    colour rules of :func:`detect_tissue` without the stroke width and margin.

    Returns:
        (ink, dark), two bool (32768,) tables.
    """
    table = colour_table(params)
    return table == INK, table == DARK


def colour_class(image: np.ndarray, params: TissueParams) -> np.ndarray:
    """uint8 class (``STAIN``, ``DARK``, ``INK``) of every pixel of an RGB image."""
    return np.take(colour_table(params), colour_cells(image))


@functools.lru_cache(maxsize=8)
def colour_table(params: TissueParams) -> np.ndarray:
    """uint8 class (STAIN, DARK, INK) of every RGB cell, judged at the cell's centre."""
    centre = (np.arange(2**BITS) << DROP) + (2**DROP - 1) / 2
    r, g, b = (c.ravel() for c in np.meshgrid(centre, centre, centre, indexing="ij"))
    value = np.maximum(np.maximum(r, g), b)
    chroma = value - np.minimum(np.minimum(r, g), b)
    hue = _hue(r, g, b, value, chroma)
    sat = chroma / value
    value /= 255
    table = np.full(r.shape, STAIN, dtype=np.uint8)
    dark = (value < params.black_value_max) | (
        (value < params.dark_value_max) & (sat < params.dark_saturation_max)
    )
    table[dark] = DARK
    if params.reject_pen:
        green_blue = _in_hue_range(hue, params.pen_hue_range) & (sat >= params.pen_saturation_min)
        red = _in_hue_range(hue, params.red_pen_hue_range) & (sat >= params.red_pen_saturation_min)
        dark_red = (
            _in_hue_range(hue, params.dark_red_pen_hue_range)
            & (value < params.dark_red_pen_value_max)
            & (sat >= params.pen_saturation_min)
        )
        table[(green_blue | red | dark_red) & ~dark] = INK
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
