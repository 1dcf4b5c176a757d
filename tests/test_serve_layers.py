"""The page's second-edition features against the real server on loopback: several indexes,
the slide-label filter and the slide-level ranking, the overlay layers (tile QC, annotations,
MIL attention) checked pixel by pixel, the picture upload (type and size refused before it is
read), and the label files read back by the annotation reader, evaluation and MIL.

The archive: ``serve_helpers.layered_archive``."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from serve_helpers import SIZE, layered_archive, post_json, raw, running

from wsi_ssl.search import SearchIndex
from wsi_ssl.serve import create_app
from wsi_ssl.storage import open_store

pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def layered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    archive = layered_archive(tmp_path_factory.mktemp("layers"))
    app = create_app(
        SearchIndex.open(archive["root"], "first"),
        slide_labels=archive["labels"],
        mil_predictions=archive["run"],
        max_image_bytes=200_000,
    )
    with running(app) as url:
        yield {**archive, "base": url}


def _png(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


def _centre_pixels(store: Any, layer: np.ndarray) -> np.ndarray:
    """The layer's RGBA at each tile's centre."""
    f = layer.shape[1] / store.source["dimensions"][0]
    c = (store.coords + store.tiling["tile_size_level0"] / 2) * f
    return layer[c[:, 1].astype(int), c[:, 0].astype(int)]


def test_indexes_labels_filter_and_slide_ranking(layered: dict[str, Any]) -> None:
    base, a, b = layered["base"], layered["a"], layered["b"]
    info = json.loads(raw(base, "GET", "/api/index")[2])
    assert [i["name"] for i in info["indexes"]] == ["first", "second"]
    assert info["labels"] == ["normal", "tumour"]
    slides = {s["slide_id"]: s["label"] for s in json.loads(raw(base, "GET", "/api/slides")[2])}
    assert slides == {a: "tumour", b: "normal"}
    store = open_store(layered["root"]).slide(a)
    x, y = (int(v) for v in store.coords[len(store.coords) // 2])
    box = [x, y, 448, 448]
    status, answer = post_json(base, "/api/search", {"slide": a, "box": box, "k": 6})
    assert status == 200 and answer["hits"][0]["slide_id"] == a  # the box itself first
    for hit in answer["hits"]:  # each region's matched tiles, as boxes for its small viewer
        coords = open_store(layered["root"]).slide(hit["slide_id"]).coords[hit["tiles"]]
        assert hit["tile_boxes"] == [[int(x), int(y), 224, 224] for x, y in coords]
    ranking = answer["slides"]
    assert [s["rank"] for s in ranking] == [1, 2] and {s["slide_id"] for s in ranking} == {a, b}
    assert ranking[0]["score"] >= ranking[1]["score"] and ranking[0]["slide_id"] == a
    assert {s["slide_id"]: s["label"] for s in ranking} == {a: "tumour", b: "normal"}
    # only slides labelled "normal": every hit and the ranking on b; the same via "second"
    for index in ("first", "second"):
        body = {"slide": a, "box": box, "k": 6, "labels": ["normal"], "index": index}
        status, only = post_json(base, "/api/search", body)
        assert status == 200 and only["index"]["name"] == index
        assert only["hits"] and {h["slide_id"] for h in only["hits"]} == {b}
        assert [s["slide_id"] for s in only["slides"]] == [b]
        assert all(h["label"] == "normal" for h in only["hits"])
    status, err = post_json(base, "/api/search", {"slide": a, "box": box, "labels": ["x"]})
    assert status == 400 and "no slide of index first has label x" in err["error"]
    status, err = post_json(base, "/api/search", {"slide": a, "box": box, "index": "nope"})
    assert status == 404 and err["type"] == "IndexNotFoundError"
    assert "first, second" in err["error"] and str(layered["root"]) not in err["error"]


def test_qc_layer_marks_the_flagged_tiles(layered: dict[str, Any]) -> None:
    from wsi_ssl.tiling.qc import kept_tiles

    base, a = layered["base"], layered["a"]
    store = open_store(layered["root"]).slide(a)
    kept = kept_tiles(store)
    assert kept.any() and (~kept).any()  # the strict tissue threshold flags some
    info = json.loads(raw(base, "GET", f"/api/slides/{a}/layers")[2])
    assert info["qc"]["flagged"] == int((~kept).sum()) and info["qc"]["n_tiles"] == store.n_tiles
    status, headers, body = raw(base, "GET", f"/api/slides/{a}/layers/qc.png")
    assert status == 200 and headers["content-type"] == "image/png"
    layer = _png(body)
    assert layer.shape == (*store.thumbnail.shape[:2], 4)
    pixels = _centre_pixels(store, layer)
    assert (pixels[~kept] == [220, 30, 30, 180]).all()
    assert (pixels[kept] == [40, 160, 60, 50]).all()


def test_annotation_layer_shows_each_tiles_class(layered: dict[str, Any]) -> None:
    from wsi_ssl.serve.layers import PALETTE

    base, a, b = layered["base"], layered["a"], layered["b"]
    store = open_store(layered["root"]).slide(a)
    info = json.loads(raw(base, "GET", f"/api/slides/{a}/layers")[2])
    assert [c["name"] for c in info["annotations"]["classes"]] == ["stroma", "tumour"]
    pixels = _centre_pixels(
        store, _png(raw(base, "GET", f"/api/slides/{a}/layers/annotations.png")[2])
    )
    centre_x = store.coords[:, 0] + store.tiling["tile_size_level0"] / 2
    left = centre_x < SIZE[0] // 2 - 112  # tiles wholly in one half
    right = centre_x > SIZE[0] // 2 + 112
    assert (pixels[left, :3] == PALETTE[0]).all() and (pixels[right, :3] == PALETTE[1]).all()
    assert (pixels[left | right, 3] == 200).all()  # fraction 1
    # the plain slide has no annotation layer: listed as none, the picture a 400
    info = json.loads(raw(base, "GET", f"/api/slides/{b}/layers")[2])
    assert info["annotations"] is None and info["mil"] is None
    status, _, body = raw(base, "GET", f"/api/slides/{b}/layers/annotations.png")
    assert status == 400 and "without annotations" in json.loads(body)["error"]


def test_attention_layer_and_prediction(layered: dict[str, Any]) -> None:
    base, a = layered["base"], layered["a"]
    store = open_store(layered["root"]).slide(a)
    info = json.loads(raw(base, "GET", f"/api/slides/{a}/layers")[2])
    assert info["mil"] == {
        "predicted": "tumour",
        "probabilities": {"normal": 0.2, "tumour": 0.8},
        "attention": True,
    }
    layer = _png(raw(base, "GET", f"/api/slides/{a}/layers/attention.png")[2])
    pixels = _centre_pixels(store, layer).astype(int)
    # attention grows with the tile row: the most attended tile is opaque yellow, the least a
    # faint dark blue (cividis: no red, which is QC's "flagged")
    assert tuple(pixels[-1]) == (254, 232, 56, 220) and tuple(pixels[0]) == (0, 34, 78, 20)
    assert info["attention_colours"][0] == [0, 34, 78, 20]
    assert info["attention_colours"][-1] == [254, 232, 56, 220]
    assert (np.diff(pixels[:, 3]) >= 0).all()
    assert raw(base, "GET", f"/api/slides/{a}/layers/bogus.png")[0] == 422


def _picture(store: Any, fmt: str) -> bytes:
    row = int(np.argmax(store.tissue_fraction))
    buf = io.BytesIO()
    Image.fromarray(np.asarray(store.tiles[row])).save(buf, format=fmt)
    return buf.getvalue()


def test_picture_upload_searches_and_is_checked(layered: dict[str, Any]) -> None:
    base, a, b = layered["base"], layered["a"], layered["b"]
    store = open_store(layered["root"]).slide(b)
    png = _picture(store, "PNG")
    status, _, body = raw(
        base, "POST", "/api/search/image?k=3&mode=tiles", png, {"Content-Type": "image/png"}
    )
    answer = json.loads(body)
    assert status == 200, answer
    assert answer["query"]["kind"] == "image" and answer["query"]["n_tiles"] == 1
    best = answer["hits"][0]  # the stored tile itself, embedded again from its pixels
    row = int(np.argmax(store.tissue_fraction))
    assert (best["slide_id"], best["x"], best["y"]) == (b, *map(int, store.coords[row]))
    assert best["score"] == pytest.approx(1.0, abs=1e-3)
    status, _, body = raw(
        base,
        "POST",
        "/api/search/image?k=3&labels=tumour",
        _picture(store, "JPEG"),
        {"Content-Type": "image/jpeg"},
    )
    assert status == 200 and {h["slide_id"] for h in json.loads(body)["hits"]} == {a}
    # wrong types: refused before anything is read (a text/plain POST is a "simple" request)
    for ctype in ("text/plain", "application/json", "image/svg+xml", "multipart/form-data"):
        status, _, body = raw(base, "POST", "/api/search/image", png, {"Content-Type": ctype})
        assert (
            status == 415 and "image/png or image/jpeg or image/tiff" in json.loads(body)["error"]
        )
    # over the configured 200 000 bytes: announced (unread) or streamed (cut at the cap)
    status, _, body = raw(
        base,
        "POST",
        "/api/search/image",
        None,
        {"Content-Type": "image/png", "Content-Length": str(300_000)},
    )
    assert status == 413 and "200000 bytes" in json.loads(body)["error"]
    big = b"\x89PNG" + bytes(250_000)  # streamed in chunks, no length: cut once past the cap
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (big[:150_000], big[150_000:]))
    status, _, body = raw(
        base,
        "POST",
        "/api/search/image",
        chunked + b"0\r\n\r\n",
        {"Content-Type": "image/png", "Transfer-Encoding": "chunked"},
    )
    assert status == 413 and len(body) < 300
    # a JSON route keeps its 64 KiB cap and JSON-only rule
    status, _, _ = raw(base, "POST", "/api/search", png, {"Content-Type": "image/png"})
    assert status == 415
    # not a picture, an empty body, a picture too large in pixels: 400 naming the problem
    status, _, body = raw(
        base, "POST", "/api/search/image", b"not an image", {"Content-Type": "image/png"}
    )
    assert status == 400 and json.loads(body)["type"] == "ImageQueryError"
    status, _, body = raw(base, "POST", "/api/search/image", b"", {"Content-Type": "image/png"})
    assert status == 400 and "no picture" in json.loads(body)["error"]
    buf = io.BytesIO()
    Image.new("RGB", (5000, 5000), "white").save(buf, format="PNG")
    status, _, body = raw(
        base, "POST", "/api/search/image", buf.getvalue(), {"Content-Type": "image/png"}
    )
    answer = json.loads(body)
    assert (
        status == 400
        and answer["type"] == "ImageTooLargeError"
        and "/" not in answer["error"].replace("µm/px", "")
    )


def test_label_files_feed_annotations_evaluation_and_mil(layered: dict[str, Any]) -> None:
    from wsi_ssl.annotations import read_annotations
    from wsi_ssl.evaluation import RegionLabelTask
    from wsi_ssl.evaluation.regions import load_region_labels
    from wsi_ssl.mil.labels import read_labels
    from wsi_ssl.serve.labels import write_slide_labels

    base, root, a, b = layered["base"], layered["root"], layered["a"], layered["b"]
    store = open_store(root).slide(a)
    side = int(store.tiling["tile_size_level0"])
    x, y = (int(v) for v in store.coords[0])
    bx, by = (int(v) for v in open_store(root).slide(b).coords[0])
    accepted, rejected = [x, y, 2 * side, side], [bx, by, 2 * side, 2 * side]
    for slide, box, verdict in ((a, accepted, "accept"), (b, rejected, "reject")):
        status, _ = post_json(
            base, "/api/labels", {"slide": slide, "box": box, "label": "tumour", "verdict": verdict}
        )
        assert status == 200
    # the GeoJSON: QuPath annotations the tiling's annotation reader takes as they are
    ann = read_annotations(root / "labels" / "geojson" / f"{a}.geojson")
    assert ann.classes == ("tumour",)
    assert ann.geometries["tumour"].bounds == (x, y, x + 2 * side, y + side)
    # MIL: a slide,label CSV its reader accepts; evaluation: the regions CSV as its region task
    post_json(base, "/api/labels", {"slide": b, "box": rejected, "label": "normal"})  # re-judged
    path = write_slide_labels(root)
    with path.open() as f:
        assert list(csv.reader(f)) == [["slide", "label"], *sorted([[a, "tumour"], [b, "normal"]])]
    table = read_labels(path)
    assert {(r.slide, r.label) for r in table.rows} == {(a, "tumour"), (b, "normal")}
    task = RegionLabelTask(root, root / "labels" / "regions.csv")
    tiles = load_region_labels(task, max_per_class=1000, seed=0)
    centres = store.coords + side / 2
    inside = np.flatnonzero(
        (x <= centres[:, 0]) & (centres[:, 0] < x + 2 * side)
        & (y <= centres[:, 1]) & (centres[:, 1] < y + side)
    )  # fmt: skip
    assert tiles.classes == ("normal", "tumour") and set(tiles.rows) == {a, b}
    assert np.array_equal(tiles.rows[a], inside) and len(tiles.rows[b]) >= 2
    order = list(tiles.rows)
    assert (tiles.y[tiles.groups == order.index(a)] == 1).all()
    assert (tiles.y[tiles.groups == order.index(b)] == 0).all()


def test_slide_labels_take_one_class_and_every_slide_of_the_archive(
    layered: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A label filter needs no second class, and labels are matched against the archive, so a
    page opened on an index of slide ``a`` alone still knows ``b``'s label for the others."""
    from wsi_ssl.serve.app import read_slide_labels

    root = layered["root"]
    one_class = tmp_path_factory.mktemp("labels") / "slides.csv"
    one_class.write_text(f"slide,label\n{layered['a']},tumour\n{layered['b']},tumour\n")
    first = SearchIndex.open(root, "first")
    assert read_slide_labels(first, one_class) == {layered["a"]: "tumour", layered["b"]: "tumour"}
    SearchIndex.build(root, "random-cnn", name="only-a", kind="flat", slides=[layered["a"]])
    only_a = SearchIndex.open(root, "only-a")
    assert read_slide_labels(only_a, layered["labels"]) == {
        layered["a"]: "tumour",
        layered["b"]: "normal",
    }


def test_a_run_without_mil_predict_output_is_refused(tmp_path: Path) -> None:
    """A run directory's own out-of-fold predictions.csv has no attention: the page needs
    what `wsi-ssl mil predict` wrote, and says so."""
    from wsi_ssl.errors import ConfigError
    from wsi_ssl.serve.layers import MilPredictions

    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "predictions.csv").write_text("slide_id,predicted\ns,normal\n")
    with pytest.raises(ConfigError, match=r"no predictions of `wsi-ssl mil predict`"):
        MilPredictions(tmp_path)
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "predictions.csv").write_text("slide_id,predicted\ns,tumour\n")
    assert MilPredictions(tmp_path).folder == tmp_path / "predictions"
    assert MilPredictions(tmp_path / "predictions").folder == tmp_path / "predictions"
