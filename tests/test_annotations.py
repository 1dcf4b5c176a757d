"""Annotation files (QuPath GeoJSON, ASAP XML, masks), their rasters and per-tile labels,
and ROI-restricted tiling of a real slide through the library and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import Polygon, box

from tests.conftest import run_cli, twin_of
from wsi_ssl.annotations import (
    UNCLASSIFIED,
    class_fractions,
    label_tiles,
    rasterize,
    read_annotations,
    roi_region,
)
from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import (
    AnnotationError,
    ConfigError,
    EmbeddingsWouldBeDiscardedError,
    NoLabelsError,
)
from wsi_ssl.storage import Archive
from wsi_ssl.tiling.batch import tile_slide

# a 400 x 300 level-0 "slide" drawn on a 4 level-0 px grid (100 x 75 pixels)
SHAPE, S = (75, 100), 4.0
RING = [[40, 40], [200, 40], [200, 200], [40, 200], [40, 40]]
HOLE = [[80, 80], [160, 80], [160, 160], [80, 160], [80, 80]]
SQUARES = [[[[240, 40], [320, 40], [320, 120], [240, 120], [240, 40]]]]


def _feature(geometry: dict, name: str | None) -> dict:
    props = {"objectType": "annotation"}
    if name is not None:
        props["classification"] = {"name": name, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _qupath(tmp_path: Path) -> Path:
    """Tumor: a square with a square hole; Stroma: a MultiPolygon; one unclassified line and
    one unclassified rectangle."""
    features = [
        _feature({"type": "Polygon", "coordinates": [RING, HOLE]}, "Tumor"),
        _feature({"type": "MultiPolygon", "coordinates": SQUARES}, "Stroma"),
        _feature({"type": "LineString", "coordinates": [[0, 0], [10, 10]]}, None),
        _feature(
            {"type": "Polygon", "coordinates": [[[0, 250], [60, 250], [60, 290], [0, 290]]]}, None
        ),
    ]
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_qupath_geojson_classes_and_holes(tmp_path: Path) -> None:
    ann = read_annotations(_qupath(tmp_path))
    assert ann.classes == ("Stroma", "Tumor", UNCLASSIFIED)  # sorted
    tumor = ann.geometries["Tumor"]
    assert tumor.area == 160 * 160 - 80 * 80  # the hole is cut out
    rasters = rasterize(ann, SHAPE, S)
    assert set(rasters) == set(ann.classes)
    # pixel-centre rasterisation of axis-aligned squares on a 4 px grid is exact here
    assert rasters["Tumor"].sum() * S * S == tumor.area
    assert rasters["Stroma"].sum() * S * S == 80 * 80
    assert not rasters["Tumor"][30, 30] and rasters["Tumor"][15, 15]  # hole, ring


def test_geojson_variants(tmp_path: Path) -> None:
    """A single Feature, a list of Features and a bare geometry all read (QuPath writes each)."""
    geometry = {"type": "Polygon", "coordinates": [RING]}
    for i, data in enumerate([_feature(geometry, "T"), [_feature(geometry, "T")], geometry]):
        path = tmp_path / f"v{i}.json"
        path.write_text(json.dumps(data))
        ann = read_annotations(path)
        assert ann.geometries[ann.classes[0]].area == 160 * 160
    # QuPath 0.2 wrote the classification as a plain string
    legacy = {"type": "Feature", "geometry": geometry, "properties": {"classification": "T"}}
    (tmp_path / "old.geojson").write_text(json.dumps(legacy))
    assert read_annotations(tmp_path / "old.geojson").classes == ("T",)
    # QuPath 0.4+ writes a derived class as its names (it was "annotation")
    derived = {**legacy, "properties": {"classification": {"names": ["Tumor", "Positive"]}}}
    (tmp_path / "derived.geojson").write_text(json.dumps(derived))
    assert read_annotations(tmp_path / "derived.geojson").classes == ("Tumor: Positive",)


def test_overlapping_and_self_intersecting_polygons_are_unioned(tmp_path: Path) -> None:
    bowtie = [[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]
    features = [
        _feature({"type": "Polygon", "coordinates": [RING]}, "T"),
        _feature(
            {
                "type": "Polygon",
                "coordinates": [[[100, 100], [260, 100], [260, 260], [100, 260], [100, 100]]],
            },
            "T",
        ),
        _feature({"type": "Polygon", "coordinates": [bowtie]}, "B"),
    ]
    path = tmp_path / "o.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    ann = read_annotations(path)
    assert ann.geometries["T"].area == 2 * 160 * 160 - 100 * 100
    assert ann.geometries["B"].is_valid and ann.geometries["B"].area == pytest.approx(5000)


def _asap(tmp_path: Path) -> Path:
    xml = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="A1" Type="Polygon" PartOfGroup="tumor">
      <Coordinates>
        <Coordinate Order="2" X="200" Y="200"/><Coordinate Order="0" X="40" Y="40"/>
        <Coordinate Order="1" X="200" Y="40"/><Coordinate Order="3" X="40" Y="200"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="A2" Type="Rectangle" PartOfGroup="exclusion">
      <Coordinates>
        <Coordinate Order="0" X="80" Y="80"/><Coordinate Order="1" X="160" Y="80"/>
        <Coordinate Order="2" X="160" Y="160"/><Coordinate Order="3" X="80" Y="160"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="P" Type="Dot" PartOfGroup="None">
      <Coordinates><Coordinate Order="0" X="5" Y="5"/></Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups><Group Name="tumor" PartOfGroup="None"/></AnnotationGroups>
</ASAP_Annotations>"""
    path = tmp_path / "a.xml"
    path.write_text(xml)
    return path


def test_asap_xml_groups_and_roi(tmp_path: Path) -> None:
    ann = read_annotations(_asap(tmp_path))
    assert ann.classes == ("exclusion", "tumor")  # the dot is ignored
    assert ann.geometries["tumor"].area == 160 * 160  # coordinates taken in Order
    rasters = rasterize(ann, SHAPE, S)
    region = roi_region(rasters, ["tumor"], ["exclusion"], ann.path)
    assert region.sum() * S * S == 160 * 160 - 80 * 80
    # default: every class not excluded; all excluded: the whole slide minus them
    assert (roi_region(rasters, [], ["exclusion"], ann.path) == region).all()
    everything_but = roi_region(rasters, [], ["exclusion", "tumor"], ann.path)
    assert everything_but.sum() == SHAPE[0] * SHAPE[1] - rasters["tumor"].sum()
    with pytest.raises(AnnotationError, match=r"'Tumour'.*holds 'exclusion', 'tumor'") as info:
        roi_region(rasters, ["Tumour"], [], ann.path)
    assert str(ann.path) in str(info.value)
    # a decimal comma, as some locales write it (refused: "could not convert '200,5'")
    comma = tmp_path / "comma.xml"
    text = ann.path.read_text().replace('X="200"', 'X="200,5"').replace('Y="40"', 'Y="39.5"')
    comma.write_text(text)
    assert read_annotations(comma).geometries["tumor"].area == 160.5 * 160.5


@pytest.mark.parametrize("suffix", [".png", ".npy"])
def test_mask_files_at_any_scale(tmp_path: Path, suffix: str) -> None:
    """A mask 1/8 of the raster's size (or 3x it) covers the whole slide."""
    small = np.zeros((10, 13), dtype=np.uint8)
    small[2:6, 3:9] = 255
    path = tmp_path / f"m{suffix}"
    if suffix == ".png":
        Image.fromarray(small).save(path)
    else:
        np.save(path, small > 0)
    ann = read_annotations(path)
    assert ann.classes == ("mask",)
    for shape in [(20, 26), (30, 39)]:
        raster = rasterize(ann, shape, 1.0)["mask"]
        k = shape[0] // 10
        np.testing.assert_array_equal(raster, (small > 0).repeat(k, 0).repeat(k, 1))


def test_palette_16_bit_and_jpeg_masks_keep_their_classes(tmp_path: Path) -> None:
    """A palette PNG's classes are its indices (they were the palette colours' brightness,
    "76" and "150"), a 16-bit mask keeps values over 255 (300 became 255), and a binary mask
    saved as JPEG is one class, "mask" (its compression noise made 11 classes)."""
    labels = np.zeros((40, 52), dtype=np.uint8)
    labels[5:20, 5:20] = 1
    labels[22:35, 30:50] = 2
    palette = Image.fromarray(labels, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    palette.save(tmp_path / "palette.png")
    ann = read_annotations(tmp_path / "palette.png")
    assert ann.classes == ("1", "2")
    np.testing.assert_array_equal(rasterize(ann, labels.shape, 1.0)["2"], labels == 2)
    deep = labels.astype(np.uint16) * 150  # values 150 and 300
    Image.fromarray(deep).save(tmp_path / "deep.png")
    deep_ann = read_annotations(tmp_path / "deep.png")
    assert deep_ann.classes == ("150", "300")
    np.testing.assert_array_equal(rasterize(deep_ann, labels.shape, 1.0)["300"], labels == 2)
    # a colour PNG: red and green would both become grey 76-ish, one class; refused
    colour = np.zeros((*labels.shape, 3), dtype=np.uint8)
    colour[labels == 1] = (255, 0, 0)
    colour[labels == 2] = (0, 130, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(AnnotationError, match="a colour mask") as info:
        read_annotations(tmp_path / "colour.png")
    assert str(tmp_path / "colour.png") in str(info.value)
    grey_rgb = np.repeat((labels * 100)[..., None], 3, axis=2)  # grey saved as RGB: its values
    Image.fromarray(grey_rgb).save(tmp_path / "grey.png")
    assert read_annotations(tmp_path / "grey.png").classes == ("100", "200")
    binary = np.where(labels > 0, 255, 0).astype(np.uint8)
    Image.fromarray(binary).save(tmp_path / "binary.jpg", quality=75)
    jpeg = read_annotations(tmp_path / "binary.jpg")
    assert jpeg.classes == ("mask",)
    drawn = rasterize(jpeg, labels.shape, 1.0)["mask"]
    assert (drawn != (labels > 0)).mean() < 0.01  # at most a few edge pixels


def test_a_label_mask_has_a_class_per_value_and_a_mask_must_fit_the_slide(
    tmp_path: Path,
) -> None:
    """Values 1 and 2 of a label mask are two classes (they were one, "mask"), and value 1
    alone is still class "1" (it was "mask", so slides of one batch named one class two ways);
    a mask not in the slide's proportions (transposed, square) is refused, not stretched."""
    labels = np.zeros(SHAPE, dtype=np.uint8)  # the raster's size: 4 level-0 px a pixel
    labels[0:25, 0:25] = 1  # level-0 (0, 0)-(100, 100)
    labels[50:75, 75:100] = 2  # level-0 (300, 200)-(400, 300)
    path = tmp_path / "labels.png"
    Image.fromarray(labels).save(path)
    assert read_annotations(path).classes == ("1", "2")
    coords = np.array([[0, 0], [100, 0], [0, 100], [300, 200]], dtype=np.int64)
    tiled = label_tiles(path, coords, 100.0, SHAPE, S, exclude=["2"])
    assert tiled.classes == ("1", "2")
    np.testing.assert_array_equal(tiled.fractions, [[1, 0], [0, 0], [0, 0], [0, 1]])
    np.testing.assert_array_equal(tiled.in_roi, [1, 0, 0, 0])  # class 1; 2 is excluded
    for shape in [(40, 30), (30, 30)]:  # a 400 x 300 slide: transposed, square
        bad = tmp_path / f"bad{shape[1]}.npy"
        np.save(bad, np.ones(shape, dtype=bool))
        with pytest.raises(AnnotationError, match=r"not in the slide's proportions") as info:
            label_tiles(bad, coords, 100.0, SHAPE, S)
        assert str(bad) in str(info.value)
    only_two = np.where(labels == 2, 2, 0).astype(np.uint8)  # a slide with label 2 alone
    Image.fromarray(only_two).save(tmp_path / "two.png")
    assert read_annotations(tmp_path / "two.png").classes == ("2",)  # not "mask"
    only_one = np.where(labels == 1, 1, 0).astype(np.uint8)  # label 1 alone: "1" as beside 2
    Image.fromarray(only_one).save(tmp_path / "one.png")
    np.save(tmp_path / "one.npy", only_one)
    for name in ("one.png", "one.npy"):
        one = label_tiles(tmp_path / name, coords, 100.0, SHAPE, S)
        assert one.classes == ("1",), name
        np.testing.assert_array_equal(one.fractions, [[1], [0], [0], [0]])
    alone = label_tiles(tmp_path / "two.png", coords, 100.0, SHAPE, S, exclude=["2"])
    np.testing.assert_array_equal(alone.in_roi, [1, 1, 1, 0])  # all but label 2
    np.save(tmp_path / "near.npy", np.ones((75, 101), dtype=bool))  # a pixel off: fine
    assert label_tiles(tmp_path / "near.npy", coords, 100.0, SHAPE, S).in_roi.all()


def test_tile_fractions_match_exact_areas(tmp_path: Path) -> None:
    """Per-tile class fractions equal shapely's exact intersection areas: tiles an edge
    crosses are measured on the polygons (the raster alone was off by up to 2 px steps of 4
    px on a 64 px tile edge), the others on the raster."""
    ann = read_annotations(_qupath(tmp_path))
    xs, ys = np.meshgrid(np.arange(0, 400, 64), np.arange(0, 300, 64))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    labels = label_tiles(ann.path, coords, 64.0, SHAPE, S, include=["Tumor"])
    assert labels.classes == ann.classes and labels.fractions.dtype == np.float32
    assert labels.fractions.shape == (len(coords), 3)
    tiles = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + 64, coords[:, 1] + 64)
    for c, name in enumerate(labels.classes):
        exact = shapely.area(shapely.intersection(tiles, ann.geometries[name])) / 64**2
        np.testing.assert_allclose(labels.fractions[:, c], exact, atol=1e-6)
    tumor = labels.fractions[:, labels.classes.index("Tumor")]
    np.testing.assert_array_equal(labels.in_roi, tumor)
    assert class_fractions({}, coords, 64.0, S).shape == (len(coords), 0)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.geojson", None, "no such annotation file"),
        ("bad.geojson", "{not json", "cannot be read"),
        (
            "points.geojson",
            json.dumps(_feature({"type": "Point", "coordinates": [1, 2]}, "x")),
            "no polygon",
        ),
        ("other.json", json.dumps({"hello": 1}), "not GeoJSON"),
        ("bad.xml", "<ASAP_Annotations><Annotations>", "cannot be read"),
        ("qupath.xml", "<Annotations/>", "not ASAP XML"),
        ("a.txt", "x", "unknown annotation format"),
        ("empty.png", b"\x89PNG\r\n", "cannot be read"),
        ("cube.npy", "cube", "2-D image"),
    ],
)
def test_bad_files_are_typed_errors_naming_the_path(
    tmp_path: Path, name: str, content: str | bytes | None, message: str
) -> None:
    path = tmp_path / name
    if content == "cube":
        np.save(path, np.zeros((2, 2, 2)))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(AnnotationError, match=message) as info:
        read_annotations(path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)


# CMU-1-Small-Region is 2220 x 2967 at 0.499 µm/px: a tumour box over the lower tissue and a
# hole annotated as "Artefact" inside it
CMU_TUMOR = box(300, 1700, 1900, 2967)
CMU_ARTEFACT = box(900, 2200, 1400, 2700)


def _cmu_geojson(tmp_path: Path) -> Path:
    features = [
        _feature(shapely.geometry.mapping(CMU_TUMOR), "Tumor"),
        _feature(shapely.geometry.mapping(CMU_ARTEFACT), "Artefact"),
    ]
    path = tmp_path / "cmu.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_stored_labels_of_a_real_slide_are_the_exact_areas(cmu_small: Path, tmp_path: Path) -> None:
    """On the default 8 µm/px mask grid (16 level-0 px a pixel), tiles along the annotation's
    edges and inside its hole carry the polygons' exact shares, as do the tiles an ROI keeps:
    a tile inside read 0.83-0.94 and one in the hole 0.17 when a raster pixel counted whole."""
    config = TilingConfig(tile_size=224, codec="zstd", tissue_threshold=0.0)
    first = tile_slide(cmu_small, tmp_path / "plain", config)
    coords = Archive(tmp_path / "plain").slide(first.details["slide_id"]).coords
    side = Archive(tmp_path / "plain").slide(first.details["slide_id"]).tiling["tile_size_level0"]
    x0, y0 = (int(v) for v in coords[len(coords) // 2])  # a tile's own square, as the hole
    hole = box(x0, y0, x0 + side, y0 + side)
    tumor = box(x0 - 2.3 * side, y0 - 1.6 * side, x0 + 2.7 * side, y0 + 2.5 * side).difference(hole)
    path = tmp_path / "tumor.geojson"
    path.write_text(json.dumps(_feature(shapely.geometry.mapping(tumor), "Tumor")))
    roi = replace(config, roi=str(path), roi_min_fraction=0.0)  # every tile touching it
    result = tile_slide(cmu_small, tmp_path / "root", roi)
    store = Archive(tmp_path / "root").slide(result.details["slide_id"])
    fractions, classes = store.labels()
    tiles = shapely.box(*store.coords.T, *(store.coords + side).T)
    exact = shapely.area(shapely.intersection(tiles, tumor)) / side**2
    assert classes == ["Tumor"] and ((exact > 0) & (exact < 1)).sum() >= 8  # edges and hole
    np.testing.assert_allclose(fractions[:, 0], exact, atol=1e-4)
    # roi_min_fraction 1: every tile wholly inside is kept (not the hole, not the half rows)
    whole = tile_slide(cmu_small, tmp_path / "whole", replace(roi, roi_min_fraction=1.0))
    inside = shapely.area(shapely.intersection(shapely.box(*coords.T, *(coords + side).T), tumor))
    assert whole.n_tiles == int((inside >= side**2 * (1 - 1e-6)).sum()) >= 4


@pytest.mark.slow
def test_roi_restricted_tiling_of_a_real_slide(cmu_small: Path, tmp_path: Path) -> None:
    roi = _cmu_geojson(tmp_path)
    config = TilingConfig(tile_size=224, codec="zstd", roi=str(roi), roi_exclude=("Artefact",))
    result = tile_slide(cmu_small, tmp_path / "root", config)
    store = Archive(tmp_path / "root").slide(result.details["slide_id"])
    full = tile_slide(cmu_small, tmp_path / "full", TilingConfig(tile_size=224, codec="zstd"))
    assert 0 < store.n_tiles < full.n_tiles
    side = store.tiling["tile_size_level0"]
    region = CMU_TUMOR.difference(CMU_ARTEFACT)
    for x, y in store.coords:  # at least half of every kept tile lies in the region
        assert region.intersection(box(x, y, x + side, y + side)).area >= 0.45 * side**2
    fractions, classes = store.labels()
    assert classes == ["Artefact", "Tumor"]
    assert fractions.shape == (store.n_tiles, 2) and fractions.dtype == np.float32
    assert (fractions[:, 1] >= 0.5).all() and (fractions[:, 0] <= 0.5).all()
    assert store.tiling["roi_exclude"] == ["Artefact"]
    with pytest.raises(NoLabelsError, match=r"no labels/other .* has: annotations"):
        store.labels("other")
    # resume: same config, same file -> skipped; the same annotations moved elsewhere too
    assert tile_slide(cmu_small, tmp_path / "root", config).status == "skipped"
    moved = tmp_path / "moved" / "cmu.geojson"
    moved.parent.mkdir()
    moved.write_bytes(roi.read_bytes())
    assert tile_slide(cmu_small, tmp_path / "root", replace(config, roi=str(moved))).status == (
        "skipped"
    )
    # roi_min_fraction 0: every tile touching the region, none outside it
    touching = tile_slide(cmu_small, tmp_path / "any", replace(config, roi_min_fraction=0.0))
    any_store = Archive(tmp_path / "any").slide(touching.details["slide_id"])
    assert store.n_tiles < any_store.n_tiles < full.n_tiles
    for x, y in any_store.coords:
        assert region.intersection(box(x, y, x + side, y + side)).area > 0
    # a re-tile with embeddings: the ROI's tiles are the ones compared, so they are kept
    from wsi_ssl.embedding import embed

    assert not embed(tmp_path / "root", "random-cnn", device="cpu", workers=0).failed
    again = tile_slide(cmu_small, tmp_path / "root", config, resume=False)
    assert again.status == "complete" and again.details["kept_embeddings"], again
    # the file exported again to the same path without the artefact: another region, so
    # the store is redone (an excluded class the file no longer holds excludes nothing)
    roi.write_text(json.dumps(_feature(shapely.geometry.mapping(CMU_TUMOR), "Tumor")))
    with pytest.raises(EmbeddingsWouldBeDiscardedError, match=r"coordinates: \d+ -> \d+ tiles"):
        tile_slide(cmu_small, tmp_path / "root", config)  # other tiles: the vectors are asked for
    redone = tile_slide(cmu_small, tmp_path / "root", config, discard_embeddings=True)
    assert redone.status == "complete" and redone.n_tiles > result.n_tiles, redone
    store = Archive(tmp_path / "root").slide(result.details["slide_id"])
    assert store.labels()[1] == ["Tumor"] and store.tiling["roi_sha256"] is not None


@pytest.mark.slow
def test_roi_cli_and_errors(cmu_small: Path, tmp_path: Path) -> None:
    roi = _cmu_geojson(tmp_path)
    out = tmp_path / "root"
    argv = ["tile", str(cmu_small), "--out", str(out), "--codec", "zstd", "--quiet"]
    code, stdout, _ = run_cli([*argv, "--roi", str(roi), "--roi-include", "Tumor"])
    assert code == 0, stdout
    store = Archive(out).slide(Archive(out).slide_ids[0])
    assert store.tiling["roi_include"] == ["Tumor"] and store.labels()[1] == ["Artefact", "Tumor"]
    assert store.tiling["roi"] == str(roi.resolve())  # recorded absolute
    # a TOML's roi is relative to the TOML file (as a CSV's rows are to the CSV)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.toml").write_text('roi = "../cmu.geojson"\nroi_include = ["Tumor"]\n')
    config_argv = [*argv, "--config", str(tmp_path / "sub" / "t.toml")]
    code, stdout, _ = run_cli(config_argv)
    assert code == 0 and "1 already complete" in stdout, stdout  # the same file, the same store
    # an unknown class fails that slide with one line naming the file
    code, _, stderr = run_cli([*argv, "--no-resume", "--roi", str(roi), "--roi-include", "Tumour"])
    assert code != 0 and str(roi) in stderr and "'Tumour'" in stderr
    # a region away from the tissue: a clear error, not an empty store
    far = tmp_path / "far.geojson"
    far.write_text(json.dumps(_feature(shapely.geometry.mapping(box(0, 0, 200, 200)), "T")))
    code, _, stderr = run_cli([*argv, "--no-resume", "--roi", str(far)])
    assert code != 0 and "no tissue tile" in stderr and str(far) in stderr
    # a region off the slide: said so, naming the class chosen (it listed every class)
    off = tmp_path / "off.geojson"
    features = [_feature(shapely.geometry.mapping(CMU_TUMOR), "Tumor")]
    features.append(_feature(shapely.geometry.mapping(box(5000, 5000, 6000, 6000)), "Outside"))
    off.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    code, _, stderr = run_cli([*argv, "--no-resume", "--roi", str(off), "--roi-include", "Outside"])
    assert code != 0 and "(class(es) Outside, which covers no tile of the slide at all)" in stderr
    # a per-slide CSV, relative to the CSV's folder, a slide named by its stem; a row naming
    # no slide of the batch is a warning
    rows = f"slide,roi\n{cmu_small.stem},cmu.geojson\nnot-there.svs,cmu.geojson\n"
    (tmp_path / "rois.csv").write_text(rows)
    csv_argv = [*argv, "--no-resume", "--roi-csv", str(tmp_path / "rois.csv")]
    code, stdout, stderr = run_cli([*csv_argv, "--roi-exclude", "Artefact"])
    assert code == 0, stdout
    assert "1 row(s) of the ROI table name no slide of this batch (not-there.svs)" in stdout
    store = Archive(out).slide(Archive(out).slide_ids[0])
    assert store.labels()[1] == ["Artefact", "Tumor"] and store.tiling["roi_exclude"] == [
        "Artefact"
    ]
    # a class no file of the batch holds: refused before any slide, nothing touched
    before = (store.path / "zarr.json").stat().st_mtime_ns
    code, _, stderr = run_cli([*csv_argv, "--roi-exclude", "Artefct"])
    assert code == 2 and "cmu.geojson) holds class 'Artefct'" in stderr, stderr
    assert "(command line: --roi-include, --roi-exclude)" in stderr
    assert (store.path / "zarr.json").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="roi_min_fraction"):
        TilingConfig(roi_min_fraction=1.5)
    # --roi-min-fraction without an annotation file: refused (it was ignored)
    code, _, stderr = run_cli([*argv, "--no-resume", "--roi-min-fraction", "0.3"])
    assert code == 2 and "roi_min_fraction is the share of a tile inside" in stderr, stderr
    assert (store.path / "zarr.json").stat().st_mtime_ns == before
    # a class both included and excluded: the flags contradict, refused before any slide (it
    # blamed the file: "no tissue tile ... check the file belongs to this slide")
    both = ["--roi", str(roi), "--roi-include", "Tumor", "--roi-exclude", "Tumor"]
    code, _, stderr = run_cli([*argv, "--no-resume", *both])
    assert code == 2 and "class(es) 'Tumor' both included and excluded" in stderr, stderr
    assert (store.path / "zarr.json").stat().st_mtime_ns == before
    # the batch's one annotation file unreadable or missing: refused before any slide (each
    # slide failed with the same error, exit 1)
    (tmp_path / "ann.txt").write_text("hello")
    for bad in (tmp_path / "ann.txt", tmp_path / "nope.geojson"):
        code, _, stderr = run_cli([*argv, "--no-resume", "--roi", str(bad)])
        assert code == 2 and str(bad) in stderr and "(command line: --roi)" in stderr, stderr
        assert stderr.count("\n") == 1
    assert (store.path / "zarr.json").stat().st_mtime_ns == before
    # --roi-include with a slide the table gives no file: refused (it was tiled whole)
    twin = twin_of(cmu_small, tmp_path)
    pair = ["tile", str(cmu_small), str(twin), "--out", str(out), "--codec", "zstd", "--quiet"]
    code, _, stderr = run_cli([*pair, "--roi-csv", str(tmp_path / "rois.csv"), *both[2:4]])
    assert code == 2 and "1 slide(s) have none" in stderr and str(twin) in stderr, stderr
    assert (store.path / "zarr.json").stat().st_mtime_ns == before


def test_a_table_row_naming_two_slides_of_a_batch_is_refused(tmp_path: Path) -> None:
    """``S`` names S.tiff and S.svs (by stem), ``x.tiff`` two folders' x.tiff (by name): the
    annotations would go to both; refused before any slide, naming them."""
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slides

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [write_synthetic_slide(tmp_path / p, (300, 300)) for p in ("S.tiff", "S.svs")]
    paths += [write_synthetic_slide(tmp_path / d / "x.tiff", (300, 300)) for d in "ab"]
    roi = _qupath(tmp_path)
    for rows, named in (({"S": str(roi)}, "'S'"), ({"x.tiff": str(roi)}, "'x.tiff'")):
        with pytest.raises(ConfigError, match="name several slides of this batch") as info:
            tile_slides(paths, tmp_path / "out", rois=rows, progress=False)
        assert named in str(info.value) and not (tmp_path / "out").exists()
    alone = tile_slides(paths[:1], tmp_path / "one", rois={"S": str(roi)}, progress=False)
    assert len(alone.outcomes) == 1  # one slide of that stem: the row is its


def test_table_rows_match_a_slide_by_absolute_or_relative_path_and_only_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row giving the absolute path names the slide given relatively (it was tiled whole,
    the row reported as naming no slide); two rows naming one slide are refused (one won)."""
    from wsi_ssl.tiling.slide_table import SlideTable

    monkeypatch.chdir(tmp_path)
    (tmp_path / "slides").mkdir()
    relative = Path("slides/cmuA.svs")
    table = SlideTable("the ROI table", {str(tmp_path / relative): "a.geojson"})
    assert table.get(relative, None) == "a.geojson" and table.unmatched([relative]) == []
    table.check_unambiguous([relative])
    both = SlideTable("the ROI table", {"cmuA.svs": "a.geojson", "cmuA": "b.geojson"})
    with pytest.raises(ConfigError, match=r"rows 'cmuA.svs', 'cmuA' of the ROI table all name"):
        both.check_unambiguous([relative])


def test_polygon_with_hole_from_shapely_rasterises_like_its_area() -> None:
    """A rotated polygon: the raster area converges to the exact area."""
    poly = shapely.affinity.rotate(Polygon(RING, [HOLE[::-1]]), 30, origin=(120, 120))
    from wsi_ssl.annotations import Annotations

    ann = Annotations(Path("x.geojson"), {"T": poly})
    raster = rasterize(ann, (300, 300), 1.0)["T"]
    assert raster.sum() == pytest.approx(poly.area, rel=0.01)
