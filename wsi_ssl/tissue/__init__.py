"""Tissue masks of H&E slide thumbnails and the tissue fraction of each tile.

The detector follows the saturation-threshold recipe of CLAM (Lu et al., 2021): glass is
grey-white and stained tissue is coloured, so Otsu's threshold (Otsu, 1979) on HSV saturation
separates them. Marker ink is coloured too, so it is rejected first by hue rules in the spirit
of histolab's pen filters (H&E is pink to purple; ink is green, blue, or a saturated or dark
red), and black scanner borders by their value. Every size is physical (µm, µm²), so one
:class:`TissueParams` works at any thumbnail scale.

Modules: ``params`` (the settings), ``colours`` (the colour rules), ``morphology`` (thresholds
and binary morphology), ``detect`` (the detector), ``tiles`` (tiles on the mask raster),
``overlay`` (pictures).
"""

from wsi_ssl.tissue.colours import colour_cells, colour_rules
from wsi_ssl.tissue.detect import detect_tissue
from wsi_ssl.tissue.overlay import coverage_overlay, mask_overlay
from wsi_ssl.tissue.params import TissueParams
from wsi_ssl.tissue.tiles import tile_cover, tissue_fraction

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
