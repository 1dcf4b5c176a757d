"""The page's layout and result count in headless Chromium against the real server on loopback:
a tall (portrait) slide opens whole in the viewer (it was cropped: the viewer's height changes
after OpenSeadragon opens), narrow windows (1100 x 800, 800 x 900) show the whole viewer and bring
the results into view after a search (its bottom and navigator were below the fold), and a
result count of 0, empty or out of range is said and the old results cleared (0 and empty
searched for 8, 101 left the old results on screen). At 800 px the viewer ended 163 px below the fold;
a window too short for it keeps the viewer above the slide list and results, not over them.

The archive: one synthetic slide, 600 x 2000 px, tiled at 224 px and indexed (random CNN)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import pytest
from serve_helpers import browser_paths, chromium, running, wait_until

from wsi_ssl.search import SearchIndex
from wsi_ssl.serve import create_app

pytestmark = [pytest.mark.browser]
pytest.importorskip("uvicorn")
pytest.importorskip("selenium")
if browser_paths() is None:
    pytest.skip("chromium and chromedriver are not installed", allow_module_level=True)

SIZE = (600, 2000)


_wait = partial(wait_until, timeout=60)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """Chromium and the server over the portrait archive."""
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.embedding import EmbedConfig, embed
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slide

    base = tmp_path_factory.mktemp("portrait")
    tiling = replace(TilingConfig(tile_size=224, codec="zstd"), tissue_threshold=0.0)
    tile_slide(write_synthetic_slide(base / "tall.tiff", SIZE, seed=7), base / "root", tiling)
    embed(base / "root", "random-cnn", EmbedConfig(batch_size=32, device="cpu", workers=0))
    index = SearchIndex.build(base / "root", "random-cnn", kind="flat")
    with running(create_app(index)) as url:
        driver = chromium(base / "profile")
        try:
            yield driver, url
        finally:
            driver.quit()


def _open(driver: Any, url: str, size: tuple[int, int]) -> None:
    """The page at window ``size``, its slide open, its layers listed and its tiles drawn."""
    driver.set_window_size(*size)
    driver.get(url + "/")
    _wait(
        lambda: driver.execute_script(
            "const v = wsi.viewer; return document.body.dataset.state === 'ready' && wsi.layers"
            " && v.world.getItemCount() > 0 && v.world.getItemAt(0).getFullyLoaded()"
            " && !v.world.needsDraw()"
            " && Math.abs(v.viewport.getZoom(false) - v.viewport.getZoom(true)) < 1e-9;"
        )
    )
    time.sleep(0.5)  # any late change of the layout, and the viewer's answer to it


def _outside(driver: Any) -> float:
    """How far (in screen px) the slide's edges lie outside the viewer (0: wholly inside)."""
    return float(
        driver.execute_script(
            "const v = wsi.viewer.viewport, el = document.getElementById('viewer');"
            "const a = v.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));"
            "const b = v.imageToViewerElementCoordinates("
            "  new OpenSeadragon.Point(arguments[0], arguments[1]));"
            "return Math.max(0, -a.x, -a.y, b.x - el.clientWidth, b.y - el.clientHeight);",
            *SIZE,
        )
    )


def test_a_portrait_slide_opens_whole(page: tuple[Any, str]) -> None:
    driver, url = page
    try:
        for size in ((1400, 900), (1600, 1000)):
            _open(driver, url, size)
            assert _outside(driver) < 1.0, size
            height = driver.execute_script("return wsi.viewer.viewport.getContainerSize().y")
            filled = driver.execute_script(
                "const v = wsi.viewer.viewport;"
                "return v.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, arguments[0]))"
                ".y - v.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0)).y;",
                SIZE[1],
            )
            assert filled > 0.9 * height  # fitted, not shrunk to a thumbnail
    finally:
        driver.set_window_size(1400, 900)


def test_a_narrow_window_shows_the_viewer_then_the_results(page: tuple[Any, str]) -> None:
    driver, url = page
    try:
        for size in ((1100, 800), (800, 900)):
            _shows_the_viewer_then_the_results(driver, url, size)
        _open(driver, url, (800, 500))  # too short for it: the viewer keeps its least height
        viewer, below = driver.execute_script(
            "const r = (s) => document.querySelector(s).getBoundingClientRect();"
            "return [r('#viewer').bottom, Math.min(r('aside').top, r('#side').top)];"
        )
        assert viewer <= below, (viewer, below)  # above the slide list, not over it
    finally:
        driver.set_window_size(1400, 900)


def _shows_the_viewer_then_the_results(driver: Any, url: str, size: tuple[int, int]) -> None:
    """At ``size`` the whole viewer lies above the fold, and a search brings the results into view."""
    _open(driver, url, size)
    fold, viewer, navigator = driver.execute_script(
        "const r = (s) => document.querySelector(s).getBoundingClientRect().bottom;"
        "return [window.innerHeight, r('#viewer'), r('#viewer .navigator')];"
    )
    assert viewer <= fold and navigator <= fold, (fold, viewer, navigator)
    assert viewer >= 0.6 * fold  # and it takes most of the window
    assert _outside(driver) < 1.0
    driver.execute_script("search([150, 800, 300, 300])")
    _wait(lambda: driver.execute_script("return document.body.dataset.state") == "results")
    top, bottom, fold = driver.execute_script(
        "const r = document.querySelector('#results .card').getBoundingClientRect();"
        "return [r.top, r.bottom, window.innerHeight];"
    )
    assert 0 <= top < fold and bottom > 0, (top, bottom, fold)


def test_a_result_count_out_of_range_is_said(page: tuple[Any, str]) -> None:
    driver, url = page
    _open(driver, url, (1400, 900))
    state = lambda: driver.execute_script("return document.body.dataset.state")  # noqa: E731
    cards = "return document.querySelectorAll('#results .card').length"
    for k in ("0", "", "101", "2.5"):
        driver.execute_script("search([150, 800, 300, 300])")
        _wait(lambda: state() == "results")
        assert driver.execute_script(cards) > 1
        driver.execute_script(f"document.getElementById('k').value = '{k}'")
        driver.execute_script("search([150, 800, 300, 300])")
        _wait(lambda: state() == "ready")
        status = driver.execute_script(
            "const s = document.getElementById('status'); return [s.className, s.textContent]"
        )
        assert status[0] == "error" and "results: a whole number from 1 to 100" in status[1], k
        assert (
            driver.execute_script(cards) == 0 and driver.execute_script("return wsi.answer") is None
        )
        driver.execute_script("document.getElementById('k').value = '3'")
    driver.execute_script("search([150, 800, 300, 300])")
    _wait(lambda: state() == "results")
    assert driver.execute_script("return wsi.answer.hits.length") == 3
