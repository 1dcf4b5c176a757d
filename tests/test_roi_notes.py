"""Notes an annotation file's reading gives the tiling's report: QuPath objects left out of
its classes, and classes lying wholly outside the slide (measured on a real slide's grid,
as the tiling stage measures them)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import box

from wsi_ssl.annotations import TileLabels, restrict_to_roi
from wsi_ssl.config import TilingConfig
from wsi_ssl.tiling.grid import TileGrid
from wsi_ssl.tiling.source import SlideSource
from wsi_ssl.tissue import tissue_fraction

# CMU-1-Small-Region is 2220 x 2967 level-0 px; 128 px tiles at 0.5 µm/px
CONFIG = TilingConfig(tile_size=128, codec="zstd", qc=False)
TUMOR = box(600, 600, 1800, 1800)


def _feature(geometry: object, name: str, object_type: str = "annotation") -> dict:
    properties = {"classification": {"name": name}, "objectType": object_type}
    mapped = shapely.geometry.mapping(geometry)
    return {"type": "Feature", "geometry": mapped, "properties": properties}


def _write(path: Path, features: list[dict]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _labels(slide: Path, roi: Path) -> TileLabels:
    """The labels the tiling stage makes of ``roi`` for ``slide`` (as ``write_store``)."""
    config = replace(CONFIG, roi=str(roi))
    with SlideSource(slide, None, config.thumbnail_mpp) as source:
        reader, slide_mpp = source.reader, source.slide_mpp()
        grid = TileGrid.for_slide(reader, slide_mpp, config)
        thumbnail, mask = source.thumbnail_and_mask()
        per_px = reader.dimensions[0] / thumbnail.shape[1]
        coords = grid.all_coords()
        keep = tissue_fraction(mask, coords, grid.tile_size_level0, per_px) >= 0.5
        _, labels = restrict_to_roi(config, keep, coords, grid.tile_size_level0, mask.shape, per_px)
    assert labels is not None
    return labels


def test_the_qupath_objects_left_out_of_the_classes_are_counted(
    cmu_small: Path, tmp_path: Path
) -> None:
    """An "export all objects" file with one annotation, 5 detections, 2 cells and a tile:
    one note counts the 8 objects left out; a file of annotations alone has no note."""
    cells = [
        _feature(shapely.Point(700 + 80 * i, 900).buffer(6), "Lymphocyte", kind)
        for i, kind in enumerate(["detection"] * 5 + ["cell"] * 2 + ["tile"])
    ]
    exported = _write(tmp_path / "all.geojson", [_feature(TUMOR, "Tumor"), *cells])
    labels = _labels(cmu_small, exported)
    assert labels.classes == ("Tumor",)
    assert labels.notes == (
        "all.geojson: 8 QuPath detection(s), cell(s) or other objects that are not annotations "
        "were left out (only annotations are ROI classes)",
    )
    only = _write(tmp_path / "only.geojson", [_feature(TUMOR, "Tumor")])
    assert _labels(cmu_small, only).notes == ()


def test_a_class_wholly_outside_the_slide_is_noted(cmu_small: Path, tmp_path: Path) -> None:
    """Of a file for another (larger) slide, the class beyond the slide's 2220 px width and
    the one only touching its right edge are named; the one half on it is not. The
    region's tiles are those of the classes on the slide."""
    features = [
        _feature(TUMOR, "Tumor"),
        _feature(box(5000, 5000, 6000, 6000), "Far"),
        _feature(box(2220, 100, 2400, 400), "Touching"),
        _feature(box(2000, 2000, 2600, 2400), "Half"),
    ]
    labels = _labels(cmu_small, _write(tmp_path / "other.geojson", features))
    assert labels.classes == ("Far", "Half", "Touching", "Tumor")
    outside = [n for n in labels.notes if "wholly outside the slide's bounds" in n]
    assert [n.split("'")[1] for n in outside] == ["Far", "Touching"]
    assert outside[0].startswith(
        "other.geojson: class 'Far' (x 5000-6000, y 5000-6000 level-0 px) lies wholly outside "
        "the slide's bounds (about 2220 x 29"
    )
    assert outside[0].endswith(
        " px) and covers no tile; check the file belongs to this slide and is in level-0 pixels"
    )
    far, touching = labels.fractions[:, 0], labels.fractions[:, 2]
    assert not far.any() and not touching.any() and labels.fractions[:, 1].any()
    assert len(labels.notes) == 2


def test_a_mask_image_has_no_notes(cmu_small: Path, tmp_path: Path) -> None:
    """A mask spans the whole slide: nothing of it is outside, nothing left out."""
    mask = np.zeros((297, 222), dtype=np.uint8)
    mask[60:180, 60:180] = 255
    np.save(tmp_path / "roi.npy", mask)
    assert _labels(cmu_small, tmp_path / "roi.npy").notes == ()
