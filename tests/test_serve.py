"""The pathologist's web page: the real uvicorn server on loopback over a real FAISS index of
CMU-1-Small-Region, a byte-different copy (its "twin": same pixels, another slide id) and a
synthetic slide, tiled losslessly and embedded with the random-init CNN."""

from __future__ import annotations

import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from serve_helpers import post_json, running

from wsi_ssl.search import SearchIndex
from wsi_ssl.serve import create_app
from wsi_ssl.storage import open_store

pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def archive(serve_archive: dict[str, Any]) -> dict[str, Any]:
    return serve_archive


@pytest.fixture(scope="module")
def server(archive: dict[str, Any]) -> Iterator[str]:
    """``create_app`` under uvicorn in a thread, on a free loopback port; yields the base URL."""
    with running(create_app(SearchIndex.open(archive["root"]))) as base:
        yield base


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_page_and_index_summary(server: str, archive: dict[str, Any]) -> None:
    status, ctype, body = _get(server + "/")
    assert status == 200 and ctype.startswith("text/html")
    page = body.decode()
    assert 'id="viewer"' in page and "openseadragon.min.js" in page and "page.js" in page
    status, ctype, body = _get(server + "/static/page.js")
    assert status == 200 and "/api/search" in body.decode() and "/api/labels" in body.decode()
    status, _, body = _get(server + "/static/vendor/openseadragon/openseadragon.min.js")
    assert status == 200 and b"OpenSeadragon" in body[:2000]
    status, _, body = _get(server + "/api/index")
    info = json.loads(body)
    stores = [open_store(archive["root"]).slide(s) for s in archive["ids"].values()]
    assert info["n_vectors"] == sum(s.n_tiles for s in stores) and info["n_slides"] == 3
    status, _, body = _get(server + "/api/slides")
    names = [s["name"] for s in json.loads(body)]
    assert names == sorted(names, key=str.lower)  # the page lists slides by name
    listed = {s["slide_id"]: s for s in json.loads(body)}
    assert set(listed) == set(archive["ids"].values())
    assert listed[archive["ids"]["twin"]]["name"] == "CMU-1-Small-Region-twin.svs"


def test_slide_details_and_thumbnail_pixels(server: str, archive: dict[str, Any]) -> None:
    store = open_store(archive["root"]).slide(archive["ids"]["cmu"])
    status, _, body = _get(server + "/api/slides/CMU-1-Small-Region.svs")  # by file name
    details = json.loads(body)
    assert status == 200 and details["slide_id"] == store.slide_id
    assert details["dimensions"] == list(store.source["dimensions"])
    h, w = store.thumbnail.shape[:2]
    assert details["thumbnail_size"] == [w, h]
    status, ctype, body = _get(server + f"/api/slides/{store.slide_id[:8]}/thumbnail.png")
    assert status == 200 and ctype == "image/png"
    assert np.array_equal(_png(body), store.thumbnail)  # PNG is lossless


def test_region_picture_is_the_stored_tile(server: str, archive: dict[str, Any]) -> None:
    store = open_store(archive["root"]).slide(archive["ids"]["s1"])
    row = store.n_tiles // 2
    x, y = (int(v) for v in store.coords[row])
    size = round(store.tiling["tile_size_level0"])
    url = f"{server}/api/slides/{store.slide_id}/region.png?box={x},{y},{size},{size}&px=224"
    status, _, body = _get(url)
    assert status == 200 and np.array_equal(_png(body), np.asarray(store.tiles[row]))
    # the outlined version differs from it only on the tile's border
    status, _, body = _get(url + f"&outline={row}")
    diff = np.any(_png(body) != np.asarray(store.tiles[row]), axis=-1)
    assert diff.any() and not diff[3:-3, 3:-3].any()


def test_region_pictures_of_tiny_and_huge_boxes(
    server: str, archive: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(archive["root"]).slide(archive["ids"]["s1"])
    row = store.n_tiles // 2
    x, y = (int(v) for v in store.coords[row])
    tile = np.asarray(store.tiles[row])
    # 4 x 4 level-0 px inside a tile: drawn at the tile's resolution, then enlarged
    url = f"{server}/api/slides/{store.slide_id}/region.png?box={x + 100},{y + 60},4,4"
    status, _, body = _get(url)
    picture = _png(body)
    assert status == 200 and picture.shape == (320, 320, 3)
    expected = tile[60:64, 100:104].reshape(-1, 3).mean(axis=0)
    assert np.abs(picture.reshape(-1, 3).mean(axis=0) - expected).max() < 8
    # a box of many tiles comes from the thumbnail; what lies off the slide is background
    from wsi_ssl.search import gallery

    monkeypatch.setattr(gallery, "MAX_MOSAIC_TILES", 0)
    w, h = (int(v) for v in store.source["dimensions"])
    status, _, body = _get(
        f"{server}/api/slides/{store.slide_id}/region.png?box={-w},{-h},{3 * w},{3 * h}&px=300"
    )
    picture = _png(body)
    ph = round(300 * h / w)
    assert status == 200 and picture.shape == (ph, 300, 3)
    third = (ph // 3 - 2, 98)  # the slide is the middle third on each axis
    assert (picture[: third[0], : third[1]] == gallery.BACKGROUND).all()
    assert (picture[-third[0] :, -third[1] :] == gallery.BACKGROUND).all()
    assert not (picture[ph // 3 + 5 : 2 * ph // 3 - 5, 105:195] == gallery.BACKGROUND).all()


def test_damaged_store_is_a_server_error(server: str, archive: dict[str, Any]) -> None:
    """A tile that cannot be decoded is the archive's fault: 500 with the reason, not 400."""
    store = open_store(archive["root"]).slide(archive["ids"]["s1"])
    shard = store.path / "tiles" / "c" / "0" / "0" / "0" / "0"
    original = shard.read_bytes()
    try:
        shard.write_bytes(original[:-5] + b"\0\0\0\0\0")  # the shard index's checksum fails
        x, y = (int(v) for v in store.coords[0])
        status, _, body = _get(
            f"{server}/api/slides/{store.slide_id}/region.png?box={x},{y},224,224"
        )
        answer = json.loads(body)
        assert status == 500 and answer["type"] == "TileReadError"
        assert "checksum" in answer["error"]
    finally:
        shard.write_bytes(original)


def test_region_search_finds_the_twin(server: str, archive: dict[str, Any]) -> None:
    cmu, twin = archive["ids"]["cmu"], archive["ids"]["twin"]
    coords = open_store(archive["root"]).slide(cmu).coords
    box = [int(coords[0, 0]), int(coords[0, 1]), 448, 448]
    status, answer = post_json(
        server, "/api/search", {"slide": cmu, "box": box, "k": 3, "exclude_self": True}
    )
    assert status == 200 and answer["mode"] == "regions"
    top = answer["hits"][0]
    assert top["slide_id"] == twin and top["box"][:2] == box[:2]
    assert all(h["slide_id"] != cmu for h in answer["hits"])
    query_tiles = answer["query"]["tiles"]
    assert query_tiles and top["n_tiles"] >= len(query_tiles)
    # the hit's picture is the query's picture: same pixels on the twin
    _, _, hit_png = _get(server + top["image"].split("&outline=")[0])
    _, _, query_png = _get(server + answer["query"]["image"].split("&outline=")[0])
    assert np.array_equal(_png(hit_png), _png(query_png))


def test_tile_and_slide_modes(server: str, archive: dict[str, Any]) -> None:
    cmu, twin = archive["ids"]["cmu"], archive["ids"]["twin"]
    coords = open_store(archive["root"]).slide(cmu).coords
    x, y = (int(v) for v in coords[5])
    box = [x, y, 224, 224]
    status, answer = post_json(
        server,
        "/api/search",
        {"slide": cmu, "box": box, "k": 2, "mode": "tiles", "exclude_self": True},
    )
    best = answer["hits"][0]
    assert status == 200 and (best["slide_id"], best["x"], best["y"]) == (twin, x, y)
    assert best["score"] == pytest.approx(1.0, abs=1e-3)
    assert best["box"] == [x - 224, y - 224, 672, 672]  # the tile in its context
    status, answer = post_json(
        server,
        "/api/search",
        {"slide": cmu, "box": box, "mode": "slides", "exclude_self": True},
    )
    assert status == 200 and answer["hits"][0]["slide_id"] == twin
    status, _, body = _get(server + answer["hits"][0]["image"])
    assert status == 200 and _png(body).ndim == 3


def test_bad_requests_get_readable_errors(server: str, archive: dict[str, Any]) -> None:
    status, body = post_json(server, "/api/search", {"slide": "nope", "box": [0, 0, 500, 500]})
    assert status == 404 and body["type"] == "UnknownSlideError" and "nope" in body["error"]
    cmu = archive["ids"]["cmu"]
    status, body = post_json(server, "/api/search", {"slide": cmu, "box": [10**7, 10**7, 50, 50]})
    assert status == 400 and body["type"] == "RegionOutsideSlideError"
    assert "outside the slide" in body["error"]
    status, body = post_json(server, "/api/search", {"slide": cmu, "box": [0, 0, 50, 50], "k": 0})
    assert status == 422  # validated before it reaches the index
    for box in ("1,2,three,4", "inf,0,10,10", "1e309,0,10,10"):
        status, _, raw = _get(f"{server}/api/slides/{cmu}/region.png?box={box}")
        assert status == 400 and "X,Y,W,H" in json.loads(raw)["error"]
    status, _, raw = _get(f"{server}/api/slides/{cmu}/region.png?box=0,0,100,100&px=5000")
    assert status == 400 and "px" in json.loads(raw)["error"]
    # a picture of a box off the slide is refused as its search is, not drawn blank
    for box in ("9999,9999,10,10", "-50,-50,50,50"):
        status, _, raw = _get(f"{server}/api/slides/{cmu}/region.png?box={box}")
        assert status == 400 and json.loads(raw)["type"] == "RegionOutsideSlideError"


def test_index_changes_show_without_a_restart(server: str, archive: dict[str, Any]) -> None:
    twin = archive["ids"]["twin"]
    index = SearchIndex.open(archive["root"], mmap=False)
    index.remove(twin)
    try:
        _, _, body = _get(server + "/api/slides")
        assert twin not in {s["slide_id"] for s in json.loads(body)}
        cmu = archive["ids"]["cmu"]
        coords = open_store(archive["root"]).slide(cmu).coords
        box = [int(coords[0, 0]), int(coords[0, 1]), 448, 448]
        status, answer = post_json(
            server, "/api/search", {"slide": cmu, "box": box, "k": 3, "exclude_self": True}
        )
        assert status == 200 and answer["hits"]
        assert all(h["slide_id"] != twin for h in answer["hits"])
        status, _, _ = _get(f"{server}/api/slides/{twin}")
        assert status == 404
        status, answer = post_json(server, "/api/search", {"slide": twin, "box": box})
        assert status == 404 and answer["type"] == "UnknownSlideError"
    finally:  # a slide taken out with remove comes back when named
        SearchIndex.open(archive["root"], mmap=False).add([twin])
    _, _, body = _get(server + "/api/slides")
    assert twin in {s["slide_id"] for s in json.loads(body)}
    _, _, body = _get(server + "/api/index")
    assert json.loads(body)["n_slides"] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serves_until_interrupted(archive: dict[str, Any]) -> None:
    cmd = [sys.executable, "-m", "wsi_ssl.cli.main", "serve", str(archive["root"]), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "serving index random-cnn" in line, proc.stderr.read() if proc.stderr else ""
        url = line.split(" at ")[1].split()[0]
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _, body = _get(url + "api/slides")
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert status == 200 and len(json.loads(body)) == 3
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert code == 0


def test_cli_errors_are_one_line(archive: dict[str, Any], tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", _free_port()))
    taken.listen()
    (tmp_path / "slides").mkdir()  # an archive root without an index
    try:
        port = str(taken.getsockname()[1])
        for argv, words in (
            (["serve", str(archive["root"]), "--port", port], "pass another --port"),
            (["serve", str(tmp_path)], "wsi-ssl index"),
        ):
            proc = subprocess.run(
                [sys.executable, "-m", "wsi_ssl.cli.main", *argv],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 2 and proc.stdout == ""
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("wsi-ssl: error:"), proc.stderr
            assert words in lines[0]
    finally:
        taken.close()
    from conftest import run_cli

    root = str(archive["root"])
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    for argv, words in (
        (["serve", str(tmp_path / "nowhere")], "no such archive root; run `wsi-ssl tile`"),
        (["serve", str(tmp_path / "a-file")], "archive root (a file, not the folder tile --out"),
        (["serve", str(tmp_path / "empty")], "(the folder holds no catalog or slides)"),
        (["serve", root, "--host", "192.0.2.1", "--token", "tok-12345"], "pass a --host"),
        (["serve", root, "--token", "semi;colon-token"], "letters, digits and - . _ ~"),
        (["serve", root, "--token", "short"], "at least 8 characters"),
    ):
        code, out, err = run_cli(argv)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert words in err


def test_page_script_parses() -> None:
    """The page's script is valid JavaScript (checked by node where the machine has it; the
    page itself is driven in Chromium by tests/test_browser.py)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    from wsi_ssl.serve.app import STATIC

    proc = subprocess.run(
        [node, "--check", str(STATIC / "page.js")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_hits_on_a_slide_retiled_after_indexing(
    serve_archive: dict[str, Any], tmp_path: Path
) -> None:
    """The twin re-tiled at 256 px while the server runs (before ``index --add``): hits on it
    keep the indexed tiles' boxes, are not outlined with the new grid's tile numbers and carry
    a note; a query from it is a conflict (409) that says it was re-tiled, not a server error."""
    from conftest import copy_archive, run_cli

    archive = copy_archive(serve_archive, tmp_path)
    root, cmu, twin = archive["root"], archive["ids"]["cmu"], archive["ids"]["twin"]
    index = SearchIndex.open(root)
    entry = index.resolve_slide(twin)
    indexed = index.coords[entry.offset : entry.offset + entry.n_tiles]
    with running(create_app(index)) as base:
        retile = ["--tile-size", "256", "--no-resume", "--discard-embeddings", "--quiet"]
        code, _, err = run_cli(["tile", str(Path(entry.path)), "--out", str(root), *retile])
        assert code == 0, err
        assert open_store(root).slide(twin).tiling["tile_size"] == 256
        coords = open_store(root).slide(cmu).coords
        box = [int(coords[0, 0]), int(coords[0, 1]), 448, 448]
        for mode in ("regions", "tiles"):
            status, answer = post_json(
                base,
                "/api/search",
                {"slide": cmu, "box": box, "k": 3, "exclude_self": True, "mode": mode},
            )
            assert status == 200, answer
            on_twin = [h for h in answer["hits"] if h["slide_id"] == twin]
            assert on_twin and all("re-tiled after indexing" in h["note"] for h in on_twin)
            assert all("outline=" not in h["image"] for h in on_twin)
            for hit in on_twin:
                boxes = hit.get("tile_boxes") or [hit["tile_box"]]
                assert all(b[2] == b[3] == 224 for b in boxes)
                expected = indexed[hit["tiles"]] if mode == "regions" else indexed[[hit["tile"]]]
                assert [b[:2] for b in boxes] == expected.tolist()
        status, answer = post_json(base, "/api/search", {"slide": twin, "box": box, "k": 3})
        assert status == 409 and answer["type"] == "TilingMismatchError"
        assert "re-tiled after indexing" in answer["error"]


def test_similar_tiles_with_the_box_centre_on_glass(server: str, archive: dict[str, Any]) -> None:
    """A box drawn about a gap in the tissue: the tile search asks with the stored tile centred
    nearest the box's centre (it answered "no stored tissue tile contains point")."""
    cmu, twin = archive["ids"]["cmu"], archive["ids"]["twin"]
    store = open_store(archive["root"]).slide(cmu)
    coords, size = store.coords[:], int(store.tiling["tile_size_level0"])
    taken = {(int(x), int(y)) for x, y in coords}
    gaps = [  # a grid cell without a tile, next to one with a tile
        (x + size, y) for x, y in sorted(taken) if (x + size, y) not in taken
    ]
    gx, gy = next(g for g in gaps if g[0] + size <= store.source["dimensions"][0])
    box = [gx - size, gy - size, 3 * size, 3 * size]
    centre = np.array([gx + size / 2, gy + size / 2])
    in_box = [
        t for t in taken if gx - size <= t[0] < gx + 2 * size and gy - size <= t[1] < gy + 2 * size
    ]
    distances = np.hypot(*(np.array(in_box) + size / 2 - centre).T)
    nearest = {t for t, d in zip(in_box, distances, strict=True) if d == distances.min()}
    status, answer = post_json(
        server,
        "/api/search",
        {"slide": cmu, "box": box, "k": 1, "mode": "tiles", "exclude_self": True},
    )
    assert status == 200, answer
    best = answer["hits"][0]
    assert best["slide_id"] == twin and (best["x"], best["y"]) in nearest
    assert best["score"] == pytest.approx(1.0, abs=1e-3)
