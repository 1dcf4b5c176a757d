"""The server's answers about one slide in words for the page's user, over the real server on
loopback and a copy of the small archive (s1.tiff 1000 x 800, s2.tiff 800 x 700):

* a slide store moved away while the server runs: every route about that slide (its details,
  thumbnail, hit picture, DZI tile, layers, searches in each mode) answers 404 naming the slide
  by its file name, not 500 with the store's path; accepting or rejecting a hit on it is
  refused and writes nothing (it wrote a label for the missing slide to regions.csv); the
  store put back, the slide is served again;
* a search box off the slide is refused naming the slide's file name, in the page's words (it
  named the slide id and asked for "X,Y,W,H in level-0 pixels", the CLI's words)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import post_json, raw, running

from wsi_ssl.search import SearchIndex
from wsi_ssl.serve import create_app

pytest.importorskip("uvicorn")

GONE = (
    "s2.tiff: its tiles are gone from the archive (moved or deleted); it cannot be opened, "
    "searched or labelled until it is tiled again or removed from the index"
)


@pytest.fixture
def site(small_archive: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The server over a copy of the small archive; ``ids`` by file name."""
    root = tmp_path / "root"
    shutil.copytree(small_archive, root)
    index = SearchIndex.open(root)
    ids = {s["name"]: s["slide_id"] for s in index.slides}
    with running(create_app(index)) as base:
        yield {"base": base, "root": root, "ids": ids}


def _routes(base: str, slide: str) -> list[str]:
    """Every GET route about ``slide``, its DZI tile's address from its details."""
    status, _, body = raw(base, "GET", f"/api/slides/{slide}")
    assert status == 200, body
    dzi = json.loads(body)["dzi"]
    return [
        f"/api/slides/{slide}",
        f"/api/slides/{slide}/thumbnail.png",
        f"/api/slides/{slide}/region.png?box=0,0,448,448&outline=0",
        dzi,
        dzi.replace(".dzi", "_files/9/0_0.jpeg"),
        f"/api/slides/{slide}/layers",
        f"/api/slides/{slide}/layers/qc.png",
    ]


def test_a_store_moved_away_while_serving_is_named_and_never_labelled(
    site: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, root, ids = site["base"], site["root"], site["ids"]
    gone, kept = ids["s2.tiff"], ids["s1.tiff"]
    routes = _routes(base, gone)
    status, labels = post_json(base, "/api/labels", {"slide": kept, "box": [0, 0, 224, 224]})
    assert status == 200, labels
    regions = root / "labels" / "regions.csv"
    before = regions.read_bytes()
    store = root / "slides" / f"{gone}.zarr"
    shutil.move(store, tmp_path / "away.zarr")

    for path in routes:
        status, _, body = raw(base, "GET", path)
        assert status == 404, (path, status, body)
        assert json.loads(body) == {"error": GONE, "type": "StoreGoneError"}, path
    for mode in ("regions", "tiles", "slides"):
        body = {"slide": gone, "box": [0, 0, 448, 448], "mode": mode}
        assert post_json(base, "/api/search", body) == (
            404,
            {"error": GONE, "type": "StoreGoneError"},
        )
    for verdict in ("accept", "reject"):
        body = {"slide": gone, "box": [0, 0, 224, 224], "label": "tumour", "verdict": verdict}
        assert post_json(base, "/api/labels", body) == (
            404,
            {"error": GONE, "type": "StoreGoneError"},
        )
    assert regions.read_bytes() == before  # no label for the slide that cannot be opened
    said = [r for r in caplog.records if r.name == "wsi_ssl.serve.app"]
    assert [(r.levelname, r.getMessage()) for r in said] == [
        ("WARNING", f"{GONE} (store {store})")
    ]  # the server's operator is told once, with the path the page's user never sees
    status, answer = post_json(
        base, "/api/search", {"slide": kept, "box": [0, 0, 448, 448], "k": 30}
    )
    assert status == 200 and {h["name"] for h in answer["hits"]} == {"s1.tiff", "s2.tiff"}

    shutil.move(tmp_path / "away.zarr", store)  # put back: served again
    assert raw(base, "GET", routes[0])[0] == 200
    body = {"slide": gone, "box": [0, 0, 448, 448], "mode": "regions"}
    assert post_json(base, "/api/search", body)[0] == 200


def test_a_box_off_the_slide_is_refused_naming_the_slide(site: dict[str, Any]) -> None:
    base, s1 = site["base"], site["ids"]["s1.tiff"]
    for mode in ("regions", "tiles", "slides"):
        for box in ([-478, 100, 374, 498], [1000, 0, 300, 300], [0, 800, 224, 224]):
            body = {"slide": s1, "box": box, "mode": mode}
            status, answer = post_json(base, "/api/search", body)
            assert (status, answer) == (
                400,
                {
                    "error": "s1.tiff: the box lies outside the slide (1000 x 800 px); "
                    "draw it on the slide",
                    "type": "RegionOutsideSlideError",
                },
            ), (mode, box)
