"""How tissue is told from glass, ink and borders: :class:`TissueParams`."""

from __future__ import annotations

from dataclasses import dataclass

from wsi_ssl.errors import ConfigError

__all__ = ["DEFAULT_PARAMS", "TissueParams"]


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


DEFAULT_PARAMS = TissueParams()
"""The default settings (shared, as the dataclass is frozen)."""
