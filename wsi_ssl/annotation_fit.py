"""How an annotation file fits the slide it is read for: what the tiling's report says of it
(the QuPath objects left out of its classes, classes lying wholly outside the slide) and the
refusal of a mask image out of the slide's proportions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from wsi_ssl.errors import AnnotationError

if TYPE_CHECKING:
    from wsi_ssl.annotations import Annotations

__all__ = ["check_mask_shape", "roi_notes"]


def roi_notes(annotations: Annotations, width: float, height: float) -> tuple[str, ...]:
    """Notes on ``annotations`` read for a slide of ``width`` x ``height`` level-0 px (as
    the tissue mask's grid spans it, to a grid pixel): how many QuPath detections, cells or
    other non-annotation objects were left out, and each class whose geometry lies wholly
    outside the slide (it covers no tile)."""
    import shapely

    name = annotations.path.name
    notes = []
    if annotations.left_out:
        notes.append(
            f"{name}: {annotations.left_out} QuPath detection(s), cell(s) or other objects "
            "that are not annotations were left out (only annotations are ROI classes)"
        )
    bounds = shapely.box(0, 0, width, height)
    for cls, geometry in annotations.geometries.items():
        if geometry.intersection(bounds).area == 0:  # touching its edge is outside too
            x0, y0, x1, y1 = geometry.bounds
            notes.append(
                f"{name}: class {cls!r} (x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f} level-0 px) "
                f"lies wholly outside the slide's bounds (about {width:.0f} x {height:.0f} px) "
                "and covers no tile; check the file belongs to this slide and is in level-0 "
                "pixels"
            )
    return tuple(notes)


def check_mask_shape(path: Path, mask_shape: tuple[int, ...], grid_shape: tuple[int, int]) -> None:
    """Refuse a mask whose sides are not in the slide's proportions (2 % or a pixel off):
    stretched over the slide, it would put its regions in the wrong places."""
    h, w = mask_shape
    expected = h * grid_shape[1] / grid_shape[0]
    if abs(w - expected) > max(1.0, 0.02 * expected):
        raise AnnotationError(
            path,
            f"a {w} x {h} px mask is not in the slide's proportions (width/height "
            f"{grid_shape[1] / grid_shape[0]:.3f}, the mask's {w / h:.3f}); a mask spans the "
            "whole slide at any scale: check it belongs to this slide and is not transposed",
        )
