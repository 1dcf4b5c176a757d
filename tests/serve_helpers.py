"""Helpers of the web-page tests: the real uvicorn server on a free loopback port, raw HTTP
requests (any header, any body), and headless Chromium through Selenium."""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """``app`` under uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


def raw(
    base: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (``Host`` included when given); the body is sent
    as is, with its ``Content-Length`` unless the headers give one or a ``Transfer-Encoding``."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest(method, path, skip_host="Host" in (headers or {}))
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        given = headers or {}
        if body is not None and "Content-Length" not in given and "Transfer-Encoding" not in given:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.send(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def post_json(base: str, path: str, data: Any) -> tuple[int, Any]:
    status, _, body = raw(
        base, "POST", path, json.dumps(data).encode(), {"Content-Type": "application/json"}
    )
    return status, json.loads(body)


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
)


def browser_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) when both are installed, else None."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def chromium(profile: Path) -> Any:
    """Headless Chromium (Debian's, through its chromedriver) with a new empty profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    assert paths is not None
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(paths[1]))


SIZE = (1792, 1344)
"""Level-0 size of the layered archive's annotated slide."""


def _slide_id(outcome: Any) -> str:
    """The slide id ``tile_slide`` reports (``slide_id``, or a SlideOutcome's details)."""
    return str(getattr(outcome, "slide_id", None) or outcome.details["slide_id"])


def layered_archive(base: Path) -> dict[str, Any]:
    """An archive for the layers, filters and indexes: slide ``a`` (``SIZE``) tiled with an
    annotation GeoJSON written by the label loop's own writer (classes stroma and tumour, the
    left and right halves) and a strict QC tissue threshold (some tiles flagged), slide ``b``
    plain; embedded with the random-init CNN; indexes "first" (flat) and "second" (hnsw);
    ``labels``: a slide,label CSV (a: tumour, b: normal); ``run``: MIL predictions of ``a`` as
    `wsi-ssl mil predict` writes them (its GeoJSON writer, its CSV columns), attention growing
    with the tile row (``attention``)."""
    from dataclasses import replace

    import numpy as np

    from wsi_ssl.config import TilingConfig
    from wsi_ssl.embedding import EmbedConfig, embed
    from wsi_ssl.mil.explain import attention_geojson
    from wsi_ssl.search import SearchIndex
    from wsi_ssl.serve.labels import geojson
    from wsi_ssl.storage import open_store
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slide

    w, h = SIZE
    half = [("a", 0, 0, w // 2, h, "stroma"), ("a", w // 2, 0, w - w // 2, h, "tumour")]
    roi = base / "halves.geojson"
    roi.write_text(json.dumps(geojson(half, "a")))
    tiling = replace(
        TilingConfig(tile_size=224, codec="zstd", roi=str(roi), qc_min_tissue=0.5),
        tissue_threshold=0.0,
    )
    root = base / "root"
    a = _slide_id(tile_slide(write_synthetic_slide(base / "a.tiff", SIZE, seed=4), root, tiling))
    plain = TilingConfig(tile_size=224, codec="zstd")
    b = _slide_id(
        tile_slide(write_synthetic_slide(base / "b.tiff", (1200, 900), seed=5), root, plain)
    )
    embed(root, "random-cnn", EmbedConfig(batch_size=32, device="cpu", workers=0))
    SearchIndex.build(root, "random-cnn", name="first", kind="flat")
    SearchIndex.build(root, "random-cnn", name="second", kind="hnsw")
    store = open_store(root).slide(a)
    attention = np.linspace(0.0, 1.0, store.n_tiles)
    attention /= attention.sum()
    preds = base / "run" / "predictions"
    attention_geojson(store, attention, preds / "geojson" / f"{a}.geojson")
    (preds / "predictions.csv").write_text(
        "slide_id,name,n_tiles,predicted,prob_normal,prob_tumour,heatmap,gallery,geojson\n"
        f"{a},a.tiff,{store.n_tiles},tumour,0.200000,0.800000,,,geojson/{a}.geojson\n"
    )
    # the run's own out-of-fold predictions.csv (other numbers) beside its predictions/
    (base / "run" / "run.json").write_text("{}")
    (base / "run" / "predictions.csv").write_text(
        f"slide_id,label,fold,predicted,prob_normal,prob_tumour\n{a},tumour,0,normal,0.6,0.4\n"
    )
    labels = base / "slides.csv"
    labels.write_text(f"slide,label\na.tiff,tumour\n{b},normal\n")
    return {
        "root": root,
        "a": a,
        "b": b,
        "labels": labels,
        "run": base / "run",
        "attention": attention,
    }


def wait_until(what: Callable[[], Any], timeout: float) -> Any:
    """``what()``'s first true value, asked every 0.1 s for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := what()):
        assert time.monotonic() < deadline, "timed out waiting for the page"
        time.sleep(0.1)
    return value


def page_ready(driver: Any) -> bool:
    """Whether the page has its slide open, its layers listed and every tile in view drawn."""
    return bool(
        driver.execute_script(
            "const v = wsi.viewer; return document.body.dataset.state === 'ready' && wsi.layers"
            " && v.world.getItemCount() > 0 && v.world.getItemAt(0).getFullyLoaded()"
            " && !v.world.needsDraw();"
        )
    )


def open_on_page(driver: Any, url: str, slide: str, size: tuple[int, int] | None = None) -> None:
    """The page (at window ``size``, when given) with ``slide`` open and drawn."""
    if size is not None:
        driver.set_window_size(*size)
    driver.get(url + "/")
    wait_until(lambda: page_ready(driver), timeout=60)
    driver.execute_script("openSlide(arguments[0])", slide)
    wait_until(
        lambda: (
            driver.execute_script("return wsi.current.slide_id") == slide and page_ready(driver)
        ),
        timeout=60,
    )
    time.sleep(0.3)  # any late change of the layout
