"""Edges of ROI tiling: QuPath exports with detections, exclude-only regions at the slide's
edge, ROI classes named in another order, and the tissue picture once the ROI file moved."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import box

from wsi_ssl.annotations import label_tiles, read_annotations
from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import AnnotationError
from wsi_ssl.storage import Archive, SlideStore
from wsi_ssl.tiling.batch import tile_slide
from wsi_ssl.tiling.qc import tissue_overlay
from wsi_ssl.tissue.overlay import ROI_OUTLINE

# CMU-1-Small-Region is 2220 x 2967 level-0 px; 128 px tiles at 0.5 µm/px
CONFIG = TilingConfig(tile_size=128, codec="zstd", qc=False)
TUMOR = box(600, 600, 1800, 1800)
STROMA = box(300, 1900, 1900, 2900)
ARTEFACT = box(1500, 600, 1800, 900)


def _feature(geometry: object, name: str, object_type: str | None = "annotation") -> dict:
    properties: dict = {"classification": {"name": name}}
    if object_type is not None:
        properties["objectType"] = object_type
    mapped = shapely.geometry.mapping(geometry)
    return {"type": "Feature", "geometry": mapped, "properties": properties}


def _write(path: Path, features: list[dict]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _store(root: Path) -> SlideStore:
    archive = Archive(root)
    return archive.slide(archive.slide_ids[0])


def test_qupath_detections_and_cells_are_not_roi_classes(cmu_small: Path, tmp_path: Path) -> None:
    """An "export all objects" file: its annotations make the region, its 300 cell and
    detection objects (and a tile) are left out, counted; a file of detections alone is
    refused, saying what it holds."""
    rng = np.random.default_rng(0)
    cells = [
        _feature(shapely.Point(x, y).buffer(6), "Lymphocyte", kind)
        for (x, y), kind in zip(
            rng.uniform(100, 2100, (300, 2)), ["detection", "cell"] * 150, strict=True
        )
    ]
    tile = _feature(box(0, 0, 500, 500), "Tile", "tile")
    unmarked = _feature(STROMA, "Stroma", None)  # no objectType: an annotation
    exported = _write(tmp_path / "all.geojson", [_feature(TUMOR, "Tumor"), unmarked, *cells, tile])
    annotations = read_annotations(exported)
    assert annotations.classes == ("Stroma", "Tumor") and annotations.left_out == 301
    only = _write(tmp_path / "only.geojson", [_feature(TUMOR, "Tumor"), unmarked])
    a = tile_slide(cmu_small, tmp_path / "a", replace(CONFIG, roi=str(exported)))
    b = tile_slide(cmu_small, tmp_path / "b", replace(CONFIG, roi=str(only)))
    with_cells, without = _store(tmp_path / "a"), _store(tmp_path / "b")
    assert a.n_tiles == b.n_tiles and np.array_equal(with_cells.coords, without.coords)
    assert with_cells.labels()[1] == ["Stroma", "Tumor"]
    np.testing.assert_array_equal(with_cells.labels()[0], without.labels()[0])
    detections = _write(tmp_path / "detections.geojson", cells)
    with pytest.raises(AnnotationError, match=r"300 QuPath detection\(s\) or cell\(s\)"):
        read_annotations(detections)


def test_an_exclude_only_roi_keeps_the_slides_edge_tiles(cmu_small: Path, tmp_path: Path) -> None:
    """An artefact file alone is the whole slide minus the artefact: exactly the tiles of a
    tiling without ROI but those at least half over the artefact; the tiles along the
    bottom and right edges, mostly off the slide, stay (they were dropped)."""
    roi = _write(tmp_path / "artefact.geojson", [_feature(ARTEFACT, "Artefact")])
    plain = tile_slide(cmu_small, tmp_path / "plain", CONFIG)
    cut = replace(CONFIG, roi=str(roi), roi_exclude=("Artefact",))
    result = tile_slide(cmu_small, tmp_path / "cut", cut)
    coords = _store(tmp_path / "plain").coords
    side = _store(tmp_path / "plain").tiling["tile_size_level0"]
    over = shapely.area(shapely.intersection(shapely.box(*coords.T, *(coords + side).T), ARTEFACT))
    expected = coords[over / side**2 <= 0.5]
    assert 0 < len(coords) - len(expected) < 6  # a few tiles lie over the artefact
    assert (coords[:, 1] + side > 2967).sum() >= 4  # edge tiles, partly off the slide
    assert result.n_tiles == len(expected) < plain.n_tiles
    assert np.array_equal(_store(tmp_path / "cut").coords, expected)


def test_whole_slide_region_of_a_vector_file_and_a_mask_at_the_edge(tmp_path: Path) -> None:
    """On a 400 x 300 slide, a tile at (380, 280) lies a quarter on it: an exclude-only
    region counts only what the excluded class covers (a binary mask's "mask" too); an
    include region keeps measuring its share of the whole tile square."""
    coords = np.array([[380, 280], [200, 100]], dtype=np.int64)
    grid, per_px = (75, 100), 4.0
    corner = box(390, 290, 400, 300)  # a quarter of the tile's part on the slide
    path = _write(tmp_path / "a.geojson", [_feature(corner, "Artefact")])
    cut = label_tiles(path, coords, 40, grid, per_px, exclude=("Artefact",))
    np.testing.assert_allclose(cut.in_roi, [1 - 100 / 1600, 1.0], atol=1e-6)
    slide = _write(tmp_path / "slide.geojson", [_feature(box(0, 0, 400, 300), "Slide")])
    kept = label_tiles(slide, coords, 40, grid, per_px, include=("Slide",))
    np.testing.assert_allclose(kept.in_roi, [0.25, 1.0], atol=1e-6)
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[29, 39] = 255  # the slide's last 10 x 10 level-0 px
    np.save(tmp_path / "m.npy", mask)
    on_mask = label_tiles(tmp_path / "m.npy", coords, 40, grid, per_px, exclude=("mask",))
    np.testing.assert_allclose(on_mask.in_roi, [1 - 100 / 1600, 1.0], atol=1e-6)


def test_roi_classes_in_another_order_or_twice_are_the_same_settings(
    cmu_small: Path, tmp_path: Path
) -> None:
    roi = _write(
        tmp_path / "r.geojson",
        [_feature(TUMOR, "Tumor"), _feature(STROMA, "Stroma"), _feature(ARTEFACT, "Artefact")],
    )
    config = replace(CONFIG, roi=str(roi), roi_include=("Tumor", "Stroma"))
    first = tile_slide(cmu_small, tmp_path / "root", config)
    store = _store(tmp_path / "root")
    stamp, labels = (store.path / "zarr.json").stat().st_mtime_ns, store.labels()
    for include in (("Stroma", "Tumor"), ("Tumor", "Stroma", "Tumor")):
        again = tile_slide(cmu_small, tmp_path / "root", replace(config, roi_include=include))
        assert again.status == "skipped" and again.n_tiles == first.n_tiles, again
    assert (store.path / "zarr.json").stat().st_mtime_ns == stamp
    assert store.labels()[1] == labels[1] == ["Artefact", "Stroma", "Tumor"]
    excluded = replace(config, roi_include=(), roi_exclude=("Artefact", "Stroma"))
    assert tile_slide(cmu_small, tmp_path / "root", excluded).status == "complete"
    swapped = replace(excluded, roi_exclude=("Stroma", "Artefact", "Stroma"))
    assert tile_slide(cmu_small, tmp_path / "root", swapped).status == "skipped"
    other = tile_slide(cmu_small, tmp_path / "root", replace(config, roi_include=("Tumor",)))
    assert other.status == "complete" and "roi_include" in other.details["retiled_because"]


def _caption_rows(picture: np.ndarray) -> np.ndarray:
    """The top rows of a picture where the tissue picture writes why its ROI is missing."""
    return picture[:14]


def test_the_tissue_picture_says_when_its_roi_file_is_gone(cmu_small: Path, tmp_path: Path) -> None:
    """The ROI file moved (the re-run from the new path is skipped, the store keeps the old
    path): the picture says across its top that the ROI is not drawn, rather than showing
    the tissue outside it as dropped without a word; the file back in place, it is drawn."""
    (tmp_path / "first").mkdir()
    roi = _write(tmp_path / "first" / "r.geojson", [_feature(STROMA, "Stroma")])
    config = replace(CONFIG, roi=str(roi))
    tile_slide(cmu_small, tmp_path / "root", config)
    store = _store(tmp_path / "root")
    drawn = tissue_overlay(store)
    assert (drawn == ROI_OUTLINE).all(axis=-1).any()
    assert (_caption_rows(drawn) == 0).all(axis=-1).mean() < 0.5  # no caption
    moved = tmp_path / "moved" / "r.geojson"
    moved.parent.mkdir()
    roi.rename(moved)
    assert tile_slide(cmu_small, tmp_path / "root", replace(config, roi=str(moved))).status == (
        "skipped"
    )
    lost = tissue_overlay(_store(tmp_path / "root"))
    assert lost.shape == drawn.shape and not (lost == ROI_OUTLINE).all(axis=-1).any()
    rows = _caption_rows(lost)
    assert (rows == 0).all(axis=-1).mean() > 0.5  # a black band with white writing
    assert (rows > 200).all(axis=-1).sum() > 50
    moved.rename(roi)  # back where it was recorded: drawn again, no caption
    assert np.array_equal(tissue_overlay(_store(tmp_path / "root")), drawn)
