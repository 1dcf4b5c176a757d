"""The viewer's deep-zoom endpoint and the label loop, against the real server on loopback:
DZI tiles compared pixel by pixel with the slide read through its reader, the stored tiles
and the thumbnail; the cache; a slide whose file is gone; accept / reject / more like these."""

from __future__ import annotations

import csv
import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import copy_archive
from PIL import Image
from serve_helpers import post_json, raw, running

from wsi_ssl.search import SearchIndex
from wsi_ssl.serve import create_app
from wsi_ssl.storage import open_store

pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def site(
    serve_archive: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    archive = copy_archive(serve_archive, tmp_path_factory.mktemp("viewer"))
    app = create_app(SearchIndex.open(archive["root"]))
    with running(app) as base:
        yield {**archive, "base": base, "app": app}


def _picture(base: str, path: str) -> np.ndarray:
    status, _, body = raw(base, "GET", path)
    assert status == 200, body[:300]
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)


def _close(a: np.ndarray, b: np.ndarray, tol: float = 4.0) -> bool:
    """Equal up to JPEG: same shape, mean absolute difference under ``tol``."""
    return a.shape == b.shape and float(np.abs(a - b).mean()) < tol


def test_dzi_tiles_are_the_slide(site: dict[str, Any], cmu_small: Path) -> None:
    from wsi_ssl.slide import open_slide

    base, sid = site["base"], site["ids"]["cmu"]
    details = json.loads(raw(base, "GET", f"/api/slides/{sid}")[2])
    assert details["source"] == "slide" and details["dzi"].endswith("/slide.dzi")
    status, headers, body = raw(base, "GET", details["dzi"])
    assert status == 200 and headers["content-type"].startswith("application/xml")
    image = ET.fromstring(body)
    size = image.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert size is not None and image.get("TileSize") == "256"
    w, h = int(size.get("Width", 0)), int(size.get("Height", 0))
    assert [w, h] == details["dimensions"]
    top = int(np.ceil(np.log2(max(w, h))))
    prefix = details["dzi"].removesuffix(".dzi") + "_files"
    with open_slide(cmu_small) as reader:
        full = reader.read_region((512, 768), 0, (256, 256)).astype(int)
        assert _close(_picture(base, f"{prefix}/{top}/2_3.jpeg"), full)
        # one level up: twice the area, halved
        half = Image.fromarray(reader.read_region((512, 512), 0, (512, 512)))
        expected = np.asarray(half.resize((256, 256), Image.Resampling.LANCZOS)).astype(int)
        assert _close(_picture(base, f"{prefix}/{top - 1}/1_1.jpeg"), expected)
        # the last column and row are cut to the slide's edge
        lw, lh = -(-w // 2), -(-h // 2)
        edge = _picture(base, f"{prefix}/{top - 1}/{(lw - 1) // 256}_{(lh - 1) // 256}.jpeg")
        assert edge.shape == ((lh - 1) % 256 + 1, (lw - 1) % 256 + 1, 3)
    # coarse levels come from the stored thumbnail: the whole slide in one tile
    whole = _picture(base, f"{prefix}/{top - 4}/0_0.jpeg")
    thumb = Image.fromarray(open_store(site["root"]).slide(sid).thumbnail)
    expected = np.asarray(thumb.resize(whole.shape[1::-1], Image.Resampling.BILINEAR)).astype(int)
    assert _close(whole, expected, 6.0)


def _matches_stored_tile(base: str, store: Any, source: str) -> str:
    """The top-level DZI tile over the store's most tissue-rich tile shows that stored tile
    where they overlap; returns the DZI tile's path."""
    w, h = (int(v) for v in store.source["dimensions"])
    top = int(np.ceil(np.log2(max(w, h))))
    row = int(np.argmax(store.tissue_fraction))
    x, y = (int(v) for v in store.coords[row])
    side = int(store.tiling["tile_size"])
    col, line = (x + side // 2) // 256, (y + side // 2) // 256
    path = f"/api/slides/{store.slide_id}/dzi/0/{source}_files/{top}/{col}_{line}.jpeg"
    picture = _picture(base, path)
    x0, y0 = max(x, col * 256), max(y, line * 256)
    x1, y1 = min(x + side, col * 256 + 256), min(y + side, line * 256 + 256)
    stored = np.asarray(store.tiles[row]).astype(int)
    ours = picture[y0 - line * 256 : y1 - line * 256, x0 - col * 256 : x1 - col * 256]
    assert ours.size > 0 and _close(ours, stored[y0 - y : y1 - y, x0 - x : x1 - x])
    return path


def test_dzi_from_the_stored_tiles_and_cached(site: dict[str, Any]) -> None:
    base = site["base"]
    store = open_store(site["root"]).slide(site["ids"]["cmu"])
    path = _matches_stored_tile(base, store, "tiles")
    picture = _picture(base, path)
    service = site["app"].app.state.service
    hits = service.cache.stats()["hits"]
    again = _picture(base, path)
    assert service.cache.stats()["hits"] == hits + 1 and np.array_equal(again, picture)


@pytest.mark.parametrize("change", ["removed", "replaced", "replaced while served"])
def test_a_slide_file_removed_or_replaced_serves_the_stored_tiles(
    tmp_path: Path, change: str
) -> None:
    """The viewer draws from the slide file only while it is the file tiled: one removed,
    or replaced by another slide of the same size (before the server starts, or while it
    serves), is drawn from the stored tiles, under both sources."""
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.embedding import EmbedConfig, embed
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slide

    slide = write_synthetic_slide(tmp_path / "s.tiff", (1600, 1200), seed=3)
    root = tmp_path / "root"
    outcome = tile_slide(slide, root, TilingConfig(tile_size=224, codec="zstd"))
    sid = str(getattr(outcome, "slide_id", None) or outcome.details["slide_id"])
    embed(root, "random-cnn", EmbedConfig(batch_size=32, device="cpu", workers=0))
    SearchIndex.build(root, "random-cnn", kind="flat")

    def change_file() -> None:
        slide.unlink()
        if change != "removed":
            write_synthetic_slide(slide, (1600, 1200), seed=4)

    if change != "replaced while served":
        change_file()
    with running(create_app(SearchIndex.open(root))) as base:
        if change == "replaced while served":
            assert json.loads(raw(base, "GET", f"/api/slides/{sid}")[2])["source"] == "slide"
            change_file()
        details = json.loads(raw(base, "GET", f"/api/slides/{sid}")[2])
        assert details["source"] == "tiles" and details["dzi"].endswith("/tiles.dzi")
        # what the page asks for, and the "slide" source too, come from the stored tiles
        store = open_store(root).slide(sid)
        _matches_stored_tile(base, store, "slide")
        _matches_stored_tile(base, store, "tiles")


def test_label_loop_writes_csv_and_geojson(site: dict[str, Any]) -> None:
    base, root = site["base"], site["root"]
    cmu, twin, s1 = site["ids"]["cmu"], site["ids"]["twin"], site["ids"]["s1"]
    status, labels = (
        raw(base, "GET", "/api/labels")[0],
        json.loads(raw(base, "GET", "/api/labels")[2]),
    )
    assert (
        status == 200 and labels["accepted"] == [] and "labels/regions.csv" in str(labels["files"])
    )
    coords = open_store(root).slide(cmu).coords
    box = [int(coords[3, 0]), int(coords[3, 1]), 448, 448]
    for slide, b, label, verdict in (
        (cmu, box, "tumour", "accept"),
        ("CMU-1-Small-Region-twin.svs", box, "tumour", "accept"),  # by file name
        (s1, [10, 20, 300, 400], "tumour", "reject"),
        (twin, [0, 0, 224, 224], "stroma", "accept"),
        (twin, [0, 0, 224, 224], "stroma", "clear"),
    ):
        status, answer = post_json(
            base, "/api/labels", {"slide": slide, "box": b, "label": label, "verdict": verdict}
        )
        assert status == 200, answer
    with (root / "labels" / "regions.csv").open() as f:
        assert list(csv.reader(f)) == [
            ["slide", "x", "y", "w", "h", "label"],
            [cmu, *map(str, box), "tumour"],
            [twin, *map(str, box), "tumour"],
        ]
    with (root / "labels" / "rejected.csv").open() as f:
        assert list(csv.reader(f))[1:] == [[s1, "10", "20", "300", "400", "tumour"]]
    collection = json.loads((root / "labels" / "geojson" / f"{twin}.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 1
    feature = collection["features"][0]
    x, y, w, h = box
    assert feature["geometry"] == {
        "type": "Polygon",
        "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]],
    }
    assert feature["properties"]["classification"]["name"] == "tumour"
    assert feature["properties"]["objectType"] == "annotation"
    # more like these: both accepted regions at once; nothing inside a labelled box
    status, more = post_json(base, "/api/labels/more", {"label": "tumour", "k": 6})
    assert status == 200 and more["query"]["regions"] == 2 and len(more["hits"]) == 6
    for hit in more["hits"]:
        tx, ty, size, _ = hit["tile_box"]
        cx, cy = tx + size / 2, ty + size / 2
        assert not (hit["slide_id"] in (cmu, twin) and x <= cx < x + w and y <= cy < y + h)
    # the verdicts outlive the server: a new app reads them back
    with running(create_app(SearchIndex.open(root))) as other:
        again = json.loads(raw(other, "GET", "/api/labels")[2])
        assert [r["slide"] for r in again["accepted"]] == [cmu, twin]


def test_label_requests_are_checked(site: dict[str, Any]) -> None:
    base, cmu = site["base"], site["ids"]["cmu"]
    for body in (
        {"slide": cmu, "box": [0, 0, 10, 10], "label": "../../etc"},
        {"slide": cmu, "box": [0, 0, 10, 10], "verdict": "maybe"},
        {"slide": cmu, "box": [0, 0, 10]},
    ):
        status, answer = post_json(base, "/api/labels", body)
        assert status == 422 and "etc" not in answer["error"], body
    for box in ([0, 0, 0, 10], [0, 0, 10**12, 10]):
        status, answer = post_json(base, "/api/labels", {"slide": cmu, "box": box})
        assert status == 400 and "width and height > 0" in answer["error"]
    status, answer = post_json(base, "/api/labels", {"slide": "nope", "box": [0, 0, 5, 5]})
    assert status == 404
    status, answer = post_json(base, "/api/labels/more", {"label": "never-used"})
    assert status == 400 and "accept a hit first" in answer["error"]


def test_concept_map_over_any_slide(site: dict[str, Any]) -> None:
    """Tiles like the accepted region light up, tiles like the rejected one stay dark, on the
    twin as on the slide they were labelled on."""
    base, root = site["base"], site["root"]
    cmu, twin = site["ids"]["cmu"], site["ids"]["twin"]
    store = open_store(root).slide(cmu)
    size = round(store.tiling["tile_size_level0"])
    inside = np.flatnonzero((store.coords + size <= store.source["dimensions"]).all(axis=1))
    gx, gy = (int(v) for v in store.coords[inside[2]])  # whole tiles, not cut by the edge
    bx, by = (int(v) for v in store.coords[inside[-3]])
    for (x, y), verdict in (((gx, gy), "accept"), ((bx, by), "reject")):
        status, _ = post_json(
            base,
            "/api/labels",
            {"slide": cmu, "box": [x, y, size, size], "label": "concept", "verdict": verdict},
        )
        assert status == 200
    status, headers, body = raw(base, "GET", f"/api/slides/{twin}/concept.png?label=concept")
    assert status == 200 and headers["content-type"] == "image/png", body[:300]
    heat = np.asarray(Image.open(io.BytesIO(body)))
    thumb = open_store(root).slide(twin).thumbnail
    assert heat.shape == (*thumb.shape[:2], 4)
    f = thumb.shape[1] / store.source["dimensions"][0]

    def alpha(x: int, y: int) -> int:
        return int(heat[int((y + size / 2) * f), int((x + size / 2) * f), 3])

    assert alpha(gx, gy) > alpha(bx, by) + 20
    status, _, body = raw(base, "GET", f"/api/slides/{twin}/concept.png?label=nothing-yet")
    assert status == 400 and "accept a hit first" in json.loads(body)["error"]
    status, _, body = raw(base, "GET", f"/api/slides/{twin}/concept.png?label=../x")
    assert status == 422


def test_label_boxes_are_clipped_to_the_slide(site: dict[str, Any], tmp_path: Path) -> None:
    """A box over the slide's edge is kept as its part on the slide (the GeoJSON stays on
    the slide); a box that misses the slide is refused and nothing is recorded."""
    base, root, s1 = site["base"], site["root"], site["ids"]["s1"]
    width, height = open_store(root).slide(s1).source["dimensions"]
    status, labels = post_json(
        base,
        "/api/labels",
        {"slide": s1, "box": [-100, height - 50, 300, 400], "label": "edge", "verdict": "accept"},
    )
    assert status == 200, labels
    [mine] = [r for r in labels["accepted"] if r["label"] == "edge"]
    assert [mine["x"], mine["y"], mine["w"], mine["h"]] == [0, height - 50, 200, 50]
    before = (root / "labels" / "regions.csv").read_bytes()
    for box in ([width, 0, 10, 10], [-50, -50, 50, 50]):
        status, answer = post_json(
            base, "/api/labels", {"slide": s1, "box": box, "label": "edge", "verdict": "accept"}
        )
        assert status == 400 and answer["type"] == "RegionOutsideSlideError"
        assert "lies outside s1.tiff" in answer["error"]
    assert (root / "labels" / "regions.csv").read_bytes() == before
    status, labels = post_json(
        base,
        "/api/labels",
        {"slide": s1, "box": [-100, height - 50, 300, 400], "label": "edge", "verdict": "clear"},
    )
    assert status == 200 and not [r for r in labels["accepted"] if r["label"] == "edge"]
    # a region kept from before boxes were clipped is replaced by a verdict on the same box
    from wsi_ssl.serve.labels import LabelBook

    book = LabelBook(tmp_path)
    book.accepted.append((s1, -100, height - 50, 300, 400, "old"))
    book.set((s1, 0, height - 50, 200, 50, "old"), "reject", "s1.tiff", (width, height))
    assert book.accepted == [] and book.rejected == [(s1, 0, height - 50, 200, 50, "old")]


def test_more_like_these_finds_k_outside_large_labelled_boxes(site: dict[str, Any]) -> None:
    """Whole slides labelled (CMU and its twin): their tiles, the nearest, are all inside a
    labelled box, so the k asked for come from the third slide."""
    base, root = site["base"], site["root"]
    cmu, twin, s1 = site["ids"]["cmu"], site["ids"]["twin"], site["ids"]["s1"]
    w, h = open_store(root).slide(cmu).source["dimensions"]
    coords = open_store(root).slide(cmu).coords
    x, y = (int(v) for v in coords[len(coords) // 2])
    for slide, box in ((cmu, [x, y, 448, 448]), (twin, [0, 0, w, h])):
        status, _ = post_json(
            base, "/api/labels", {"slide": slide, "box": box, "label": "wide", "verdict": "accept"}
        )
        assert status == 200
    status, _ = post_json(
        base,
        "/api/labels",
        {"slide": cmu, "box": [0, 0, w, h], "label": "other", "verdict": "reject"},
    )
    assert status == 200
    status, more = post_json(base, "/api/labels/more", {"label": "wide", "k": 10})
    assert status == 200 and len(more["hits"]) == 10 and more["k"] == 10
    assert more["hits_per_tile"] >= 10  # the neighbours fetched per tile to find them
    assert {hit["slide_id"] for hit in more["hits"]} == {s1}, [
        (x["slide_id"][:4], x["tile_box"]) for x in more["hits"]
    ]
    assert [hit["rank"] for hit in more["hits"]] == list(range(1, 11))
    for slide in (cmu, twin):
        post_json(
            base,
            "/api/labels",
            {"slide": slide, "box": [0, 0, w, h], "label": "wide", "verdict": "clear"},
        )
    post_json(
        base,
        "/api/labels",
        {"slide": cmu, "box": [x, y, 448, 448], "label": "wide", "verdict": "clear"},
    )
    post_json(
        base,
        "/api/labels",
        {"slide": cmu, "box": [0, 0, w, h], "label": "other", "verdict": "clear"},
    )


def test_concept_map_has_one_scale_for_the_archive(site: dict[str, Any]) -> None:
    """A CMU region accepted: its twin lights up where the region is, while the synthetic
    slide, unlike it, stays fainter everywhere (each slide scaled to itself drew both full)."""
    base, root = site["base"], site["root"]
    cmu, twin, s1 = site["ids"]["cmu"], site["ids"]["twin"], site["ids"]["s1"]
    coords = open_store(root).slide(cmu).coords
    x, y = (int(v) for v in coords[len(coords) // 2])
    status, _ = post_json(
        base,
        "/api/labels",
        {"slide": cmu, "box": [x, y, 448, 448], "label": "scale", "verdict": "accept"},
    )
    assert status == 200

    def alpha(slide: str) -> np.ndarray:
        status, _, body = raw(base, "GET", f"/api/slides/{slide}/concept.png?label=scale")
        assert status == 200, body[:300]
        return np.asarray(Image.open(io.BytesIO(body)))[..., 3].astype(int)

    on_twin, on_s1 = alpha(twin), alpha(s1)
    assert on_twin.max() == 200  # the accepted tiles themselves, at the top of the scale
    assert on_s1.max() < on_twin.max() and on_s1.mean() < on_twin.mean()
    # a slide without its embeddings (re-tiled, not re-embedded) is left out of the scale's
    # sample; the other slides' maps are still drawn
    status, _ = post_json(
        base,
        "/api/labels",
        {"slide": cmu, "box": [x, y, 224, 224], "label": "scale", "verdict": "reject"},
    )
    assert status == 200
    embeddings = open_store(root).store_path(s1) / "embeddings"
    embeddings.rename(embeddings.with_name("embeddings-away"))
    try:
        assert alpha(twin).shape == on_twin.shape
    finally:
        embeddings.with_name("embeddings-away").rename(embeddings)


@pytest.mark.parametrize("given", ["folder", "file"])
def test_a_dicom_series_is_drawn_from_its_files(
    slides_dir: Path, tmp_path: Path, given: str
) -> None:
    """A DICOM slide tiled as its folder or one of its .dcm files is recognised by the
    series' fingerprint (its files together), so the viewer draws from it; removed, it is
    drawn from the stored tiles, and put back, from its files again."""
    from tests.test_dicom import NAMES, copy_series
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.serve.pyramid import Pyramid, open_slide_file
    from wsi_ssl.tiling.batch import tile_slide

    series = copy_series(slides_dir, tmp_path / "series", names=NAMES)
    slide = series if given == "folder" else series / NAMES[0]
    config = TilingConfig(tile_size=16, mpp=0.5, tissue_threshold=0.0, codec="zstd")
    outcome = tile_slide(slide, tmp_path / "root", config)
    store = open_store(tmp_path / "root").slide(str(outcome.details["slide_id"]))
    pyramid = Pyramid(store, *open_slide_file(store))
    assert pyramid.file is not None and not pyramid.file_replaced()
    series.rename(tmp_path / "away")
    assert pyramid.file_replaced()
    gone = Pyramid(store, *open_slide_file(store))
    assert gone.file is None and not gone.file_replaced()
    (tmp_path / "away").rename(series)
    assert gone.file_replaced() and Pyramid(store, *open_slide_file(store)).file is not None
