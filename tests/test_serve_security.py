"""``wsi-ssl serve`` is safe to leave running: each case of issue 15 against the real uvicorn
server on loopback (raw HTTP, so any header and any body can be sent), over a copy of the
serve archive that these tests may change."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import copy_archive
from PIL import Image
from serve_helpers import post_json, raw, running

from wsi_ssl.errors import ConfigError
from wsi_ssl.search import SearchIndex
from wsi_ssl.serve import create_app
from wsi_ssl.storage import SlideStore, open_store

pytest.importorskip("uvicorn")
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def site(
    serve_archive: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    archive = copy_archive(serve_archive, tmp_path_factory.mktemp("security"))
    app = create_app(SearchIndex.open(archive["root"]))
    with running(app) as base:
        yield {**archive, "base": base, "app": app}


def _box(archive: dict[str, Any], key: str, tiles: int = 2) -> list[int]:
    store = open_store(archive["root"]).slide(archive["ids"][key])
    x, y = (int(v) for v in store.coords[0])
    side = round(tiles * store.tiling["tile_size_level0"])
    return [x, y, side, side]


def test_json_bodies_are_capped_before_they_are_read(site: dict[str, Any]) -> None:
    base = site["base"]
    # a 300 MiB body announced: refused unread (nothing but the headers is sent)
    status, _, body = raw(
        base, "POST", "/api/search", None, {**JSON, "Content-Length": str(300 << 20)}
    )
    assert status == 413 and "65536 bytes" in json.loads(body)["error"]
    # 1 MiB sent in chunks without a length: refused once it passes the cap
    big = json.dumps({"slide": "x" * (1 << 20), "box": [0, 0, 1, 1]}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (big[:65000], big[65000:]))
    status, _, body = raw(
        base,
        "POST",
        "/api/search",
        chunked + b"0\r\n\r\n",
        {**JSON, "Transfer-Encoding": "chunked"},
    )
    assert status == 413 and len(body) < 300 and b"xxx" not in body
    # under the cap, an over-long field is refused by name, its value not echoed
    status, _, body = raw(
        base,
        "POST",
        "/api/search",
        json.dumps({"slide": "y" * 60000, "box": [0, 0, 9, 9]}).encode(),
        JSON,
    )
    assert status == 422 and b"yyy" not in body and "slide" in json.loads(body)["error"]
    status, _, body = raw(base, "POST", "/api/nowhere", b'{"a": "' + b"z" * 60000 + b'"}', JSON)
    assert status in (404, 405) and b"zzz" not in body


def test_only_json_posts_and_no_echo(site: dict[str, Any]) -> None:
    """A text/plain POST (a CORS "simple" request any web page can send) is refused."""
    base = site["base"]
    payload = json.dumps({"slide": "w" * 90000, "box": [0, 0, 10, 10]}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        status, _, body = raw(base, "POST", "/api/search", payload, {"Content-Type": ctype})
        assert status == 415 and b"www" not in body, ctype
        assert json.loads(body)["error"] == "requests with a body must be application/json"
    status, _, body = raw(base, "POST", "/api/labels", b"{}", {})
    assert status == 415


def test_host_allow_list(site: dict[str, Any]) -> None:
    base, port = site["base"], site["base"].rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "192.168.1.10", "localhost.evil.example"):
        status, _, body = raw(base, "GET", "/api/slides", None, {"Host": host})
        assert status == 400 and "host" in json.loads(body)["error"], host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        status, _, body = raw(base, "GET", "/api/slides", None, {"Host": host})
        assert status == 200 and len(json.loads(body)) == 3, host


def test_paths_are_redacted_from_messages() -> None:
    from wsi_ssl.serve.security import redact_paths

    message = "/srv/archive/slides/ab12.zarr: store is 'writing' (C:\\data\\x.svs); 0.5 µm/px"
    assert redact_paths(message) == "ab12.zarr: store is 'writing' (x.svs); 0.5 µm/px"
    relative = "data/arch/slides/1d3c.zarr: tiled at 0.5 µm/px; arch2/slides/x.zarr/ too"
    assert redact_paths(relative) == "1d3c.zarr: tiled at 0.5 µm/px; x.zarr too"


def test_headers_and_no_api_docs(site: dict[str, Any]) -> None:
    base = site["base"]
    for path in ("/", "/api/index", "/static/page.js", "/api/slides/nope"):
        _, headers, _ = raw(base, "GET", path)
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp, path
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        status, _, _ = raw(base, "GET", path)
        assert status == 404, path
    _, _, page = raw(base, "GET", "/")
    assert b"<script>" not in page and b"https://" not in page  # no inline script, no CDN


def test_no_filesystem_paths_in_answers(site: dict[str, Any]) -> None:
    base, root = site["base"], site["root"]
    status, _, body = raw(base, "GET", "/api/index")
    info = json.loads(body)
    assert status == 200 and "path" not in info and str(root) not in body.decode()
    assert "/tmp" not in body.decode() and str(Path.home()) not in body.decode()
    store = open_store(root).slide(site["ids"]["s1"])
    shard = store.path / "tiles" / "c" / "0" / "0" / "0" / "0"
    original = shard.read_bytes()
    try:
        shard.write_bytes(original[:-5] + b"\0\0\0\0\0")
        x, y = (int(v) for v in store.coords[1])
        status, _, body = raw(
            base, "GET", f"/api/slides/{store.slide_id}/region.png?box={x},{y},200,200"
        )
        answer = json.loads(body)
        assert status == 500 and answer["type"] == "TileReadError" and "checksum" in answer["error"]
        assert str(root) not in answer["error"] and "/tmp" not in answer["error"]
    finally:
        shard.write_bytes(original)
    for slide in ("../../etc/passwd", "%2Fetc%2Fpasswd", "a" * 150):
        status, _, body = raw(base, "GET", f"/api/slides/{slide}")
        assert status == 404 and str(root) not in body.decode()


def test_absurd_boxes_and_costly_requests_are_400(
    site: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, cmu = site["base"], site["ids"]["cmu"]
    for box in ("-1e20,-1e20,2e20,2e20", "nan,0,10,10", "0,0,1e300,5", "1,2,3", "0,0,-5,5"):
        status, _, body = raw(base, "GET", f"/api/slides/{cmu}/region.png?box={box}")
        assert status == 400 and "box" in json.loads(body)["error"], box
    status, _, body = raw(
        base, "GET", f"/api/slides/{cmu}/region.png?box=0,0,99,99&outline=" + ",".join(["1"] * 1001)
    )
    assert status == 400 and "at most 1000" in json.loads(body)["error"]
    status, _, _ = raw(base, "GET", f"/api/slides/{cmu}/dzi/0/slide_files/40/0_0.jpeg")
    assert status == 400
    status, _, _ = raw(base, "GET", f"/api/slides/{cmu}/dzi/0/slide_files/5/99_0.jpeg")
    assert status == 400
    # a region query over more tiles than the cap is refused before it reaches the index
    from wsi_ssl.serve import service

    monkeypatch.setattr(service, "MAX_QUERY_TILES", 3)
    status, answer = post_json(base, "/api/search", {"slide": cmu, "box": _box(site, "cmu", 3)})
    assert status == 400 and "at most 3" in answer["error"]


def test_the_region_cap_counts_the_tiles_the_query_takes(
    site: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A box reaching into more tiles than the cap but holding the centres of no more than it
    is searched with exactly those tiles (it was refused, counted by any overlap)."""
    from wsi_ssl.search.queries import centres_in
    from wsi_ssl.serve import service
    from wsi_ssl.serve.pyramid import tiles_in

    store = open_store(site["root"]).slide(site["ids"]["cmu"])
    size = store.tiling["tile_size_level0"]
    x, y, side, _ = _box(site, "cmu", 2)
    box = [round(x + size / 2), round(y + size / 2), side, side]  # over 3 x 3 tiles' area
    taken = centres_in(store.coords, size, store.source["dimensions"], box)
    assert 0 < len(taken) < len(tiles_in(store, box))
    monkeypatch.setattr(service, "MAX_QUERY_TILES", len(taken))
    status, answer = post_json(site["base"], "/api/search", {"slide": store.slide_id, "box": box})
    assert status == 200, answer
    assert answer["query"]["tiles"] == taken.tolist()
    monkeypatch.setattr(service, "MAX_QUERY_TILES", len(taken) - 1)
    status, answer = post_json(site["base"], "/api/search", {"slide": store.slide_id, "box": box})
    assert status == 400 and f"box holds {len(taken)} tiles" in answer["error"]


def test_large_region_pictures_come_from_the_pyramid(
    site: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_PICTURE_TILES a region picture is drawn at its size from the slide's pyramid
    (bounded cost), not from each stored tile."""
    from wsi_ssl.serve import pictures
    from wsi_ssl.serve.pyramid import Pyramid
    from wsi_ssl.slide import open_slide

    monkeypatch.setattr(pictures, "MAX_PICTURE_TILES", 2)
    store = open_store(site["root"]).slide(site["ids"]["cmu"])
    x, y, w, h = _box(site, "cmu", 3)
    status, _, body = raw(
        site["base"], "GET", f"/api/slides/{store.slide_id}/region.png?box={x},{y},{w},{h}&px=300"
    )
    got = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    with open_slide(store.source["path"]) as reader:
        expected = np.asarray(Pyramid(store, reader).region((x, y, w, h), (300, 300), "slide"))
    assert status == 200 and np.array_equal(got, expected)


def test_search_answers_while_16_clients_fetch_pictures(site: dict[str, Any]) -> None:
    """Pictures are drawn in their own bounded pool: searches still answer, correctly."""
    base, cmu, twin = site["base"], site["ids"]["cmu"], site["ids"]["twin"]
    store = open_store(site["root"]).slide(cmu)
    w, h = (int(v) for v in store.source["dimensions"])
    urls = [
        f"/api/slides/{sid}/region.png?box={i},{i},{w // 2},{h // 2}&px={600 + i}"
        for i in range(32)
        for sid in (cmu,)
    ]
    box = _box(site, "cmu")
    with ThreadPoolExecutor(16) as pool:
        pictures = [pool.submit(raw, base, "GET", u) for u in urls]
        answers = [
            post_json(base, "/api/search", {"slide": cmu, "box": box, "exclude_self": True})
            for _ in range(5)
        ]
        statuses = [p.result()[0] for p in pictures]
    assert all(s == 200 for s, _ in answers)
    assert all(a["hits"][0]["slide_id"] == twin for _, a in answers)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 16


def test_render_pool_refuses_beyond_its_queue() -> None:
    from wsi_ssl.serve.service import BusyError, RenderPool

    pool = RenderPool(workers=1, queue=1)
    release = threading.Event()

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(pool.run(release.wait, 30))
        second = asyncio.ensure_future(pool.run(lambda: "second"))
        await asyncio.sleep(0.05)
        with pytest.raises(BusyError):
            await pool.run(lambda: "third")
        release.set()
        return [await first, await second]

    try:
        assert asyncio.run(scenario()) == [True, "second"]
    finally:
        pool.close()


def test_token_required_off_loopback(site: dict[str, Any]) -> None:
    app = create_app(SearchIndex.open(site["root"]), allowed_hosts=("*",), token="s3cret-token")
    with running(app) as base:
        status, _, _ = raw(base, "GET", "/api/slides", None, {"Host": "lab-server.example"})
        assert status == 401
        status, _, _ = raw(base, "GET", "/api/slides", None, {"Authorization": "Bearer wrong"})
        assert status == 401
        status, _, body = raw(
            base, "GET", "/api/slides", None, {"Authorization": "Bearer s3cret-token"}
        )
        assert status == 200 and len(json.loads(body)) == 3
        status, headers, _ = raw(base, "GET", "/?token=s3cret-token")
        cookie = headers["set-cookie"].split(";")[0]
        assert status == 200 and "HttpOnly" in headers["set-cookie"]
        assert "SameSite=Strict" in headers["set-cookie"]
        status, _, _ = raw(base, "GET", "/api/slides", None, {"Cookie": cookie})
        assert status == 200
    with pytest.raises(ConfigError, match="letters, digits"):  # it would not survive a cookie
        create_app(SearchIndex.open(site["root"]), token="s3cret token;")


def test_bearer_scheme_in_any_case(site: dict[str, Any]) -> None:
    """RFC 7235: the auth scheme is case-insensitive; the token itself is not."""
    app = create_app(SearchIndex.open(site["root"]), allowed_hosts=("*",), token="s3cret-token")
    with running(app) as base:
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
            for value in (f"{scheme} s3cret-token", f"{scheme}   s3cret-token "):
                status, _, _ = raw(base, "GET", "/api/slides", None, {"Authorization": value})
                assert status == 200, value
        for value in (
            "bearer S3CRET-TOKEN",  # the token keeps its case
            "bearer wrong-token",
            "bearer",
            "bearers3cret-token",
            "Basic s3cret-token",
            "bearer\ts3cret-token",
        ):
            status, _, _ = raw(base, "GET", "/api/slides", None, {"Authorization": value})
            assert status == 401, value
        # a wrong header is not rescued by a good cookie, as before
        cookie = "wsi_ssl_token=s3cret-token"
        status, _, _ = raw(base, "GET", "/api/slides", None, {"Cookie": cookie})
        assert status == 200
        headers = {"Cookie": cookie, "Authorization": "bearer wrong-token"}
        assert raw(base, "GET", "/api/slides", None, headers)[0] == 401
        # ?token= still only on the page itself
        assert raw(base, "GET", "/api/slides?token=s3cret-token")[0] == 401
        assert raw(base, "GET", "/?token=s3cret-token")[0] == 200


def test_cli_refuses_open_host_without_token(site: dict[str, Any]) -> None:
    cmd = [sys.executable, "-m", "wsi_ssl.cli.main", "serve", str(site["root"])]
    proc = subprocess.run([*cmd, "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--token" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc2 = subprocess.Popen(
        [*cmd, "--host", "0.0.0.0", "--port", "0", "--token", "tok-12345"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc2.stdout is not None and proc2.stderr is not None
        line = proc2.stdout.readline()
        port = line.split(" at ")[1].split(":")[2].split("/")[0]
        url = f"http://127.0.0.1:{port}/api/slides"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
            except urllib.error.HTTPError as err:
                assert err.code == 401
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        request = urllib.request.Request(url, headers={"Authorization": "Bearer tok-12345"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200
    finally:
        proc2.send_signal(signal.SIGINT)
        proc2.wait(30)
    warning = proc2.stderr.read()
    assert "warning" in warning and "0.0.0.0" in warning


def test_changed_store_is_revalidated(site: dict[str, Any], cmu_small: Path) -> None:
    """Re-tiled: the new geometry is drawn; set back to "writing": no pictures (503)."""
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.search.gallery import region_mosaic
    from wsi_ssl.tiling.batch import tile_slide

    base, sid = site["base"], site["ids"]["cmu"]
    status, _, body = raw(base, "GET", f"/api/slides/{sid}")
    details = json.loads(body)
    assert details["tile_size_level0"] == pytest.approx(224, abs=1)
    x, y, w, h = 600, 900, 700, 500
    url = f"/api/slides/{sid}/region.png?box={x},{y},{w},{h}&px=350"
    before = raw(base, "GET", url)[2]
    tile_slide(
        cmu_small,
        site["root"],
        TilingConfig(tile_size=160, codec="zstd"),
        discard_embeddings=True,
    )
    store = SlideStore.open(site["root"] / "slides" / f"{sid}.zarr")
    status, _, body = raw(base, "GET", f"/api/slides/{sid}")
    assert json.loads(body)["tile_size_level0"] == pytest.approx(160, abs=1)
    assert json.loads(body)["dzi"] != details["dzi"]  # a new URL: no browser-cached tiles
    status, _, after = raw(base, "GET", url)
    expected = np.asarray(region_mosaic(store, (x, y, w, h), panel_px=350))
    got = np.asarray(Image.open(io.BytesIO(after)).convert("RGB"))
    assert status == 200 and after != before and np.array_equal(got, expected)
    writable = SlideStore.open(store.path, mode="r+", require_complete=False)
    writable.group.attrs["status"] = "writing"
    for path in (
        url,
        f"/api/slides/{sid}/thumbnail.png",
        f"/api/slides/{sid}/dzi/0/slide_files/9/0_0.jpeg",
    ):
        status, _, body = raw(base, "GET", path)
        assert status == 503 and json.loads(body)["type"] == "StoreIncompleteError", path
