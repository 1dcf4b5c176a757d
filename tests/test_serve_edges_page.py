"""The page in headless Chromium against the real server on loopback, over a copy of the small
archive (s1.tiff 1000 x 800, s2.tiff 800 x 700):

* switching "show" to similar tiles and back keeps the box drawn (the tile answer's centre tile
  replaced it: the next search asked about one tile);
* in a narrow window (800 x 900, the results below the viewer) a hit clicked brings the viewer
  into view (its slide opened far above, off screen), and a label refused is said on the card
  whose button was pressed (only in the status line, off screen);
* a slide store moved away while the page is open: the open slide's tiles failing, its hit
  pictures, ✓ accept on its hits and opening it from the list each say why, naming the slide
  (tiles failed silently, pictures broke, a label was written, the list answered 500);
* "search the view" asks about the part of the slide in view, from the keyboard alone."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import browser_paths, chromium, open_on_page, page_ready, running, wait_until

from wsi_ssl.search import SearchIndex
from wsi_ssl.serve import create_app

pytestmark = [pytest.mark.browser]
pytest.importorskip("uvicorn")
pytest.importorskip("selenium")
if browser_paths() is None:
    pytest.skip("chromium and chromedriver are not installed", allow_module_level=True)

_wait = partial(wait_until, timeout=60)
BOX = [224, 224, 448, 448]
GONE = "s2.tiff: its tiles are gone from the archive (moved or deleted)"


@pytest.fixture(scope="module")
def page(small_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Chromium and the server over a copy of the small archive; ``ids`` by file name."""
    base = tmp_path_factory.mktemp("edges_page")
    root = base / "root"
    shutil.copytree(small_archive, root)
    index = SearchIndex.open(root)
    ids = {s["name"]: s["slide_id"] for s in index.slides}
    with running(create_app(index)) as url:
        driver = chromium(base / "profile")
        try:
            yield {"driver": driver, "url": url, "root": root, "ids": ids, "base": base}
        finally:
            driver.quit()


def _search(driver: Any, box: list[int]) -> dict[str, Any]:
    driver.execute_script("search(arguments[0])", box)
    _wait(lambda: driver.execute_script("return document.body.dataset.state") == "results")
    return dict(driver.execute_script("return wsi.answer"))


def _pick_mode(driver: Any, mode: str) -> dict[str, Any]:
    """``mode`` picked in the "show" menu (the last search asked again), its answer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "mode")).select_by_value(mode)
    _wait(
        lambda: driver.execute_script(
            "return document.body.dataset.state === 'results' && wsi.answer.mode === arguments[0]",
            mode,
        )
    )
    return dict(driver.execute_script("return wsi.answer"))


def test_similar_tiles_and_back_keeps_the_box_drawn(page: dict[str, Any]) -> None:
    driver, s1 = page["driver"], page["ids"]["s1.tiff"]
    open_on_page(driver, page["url"], s1, (1400, 900))
    try:
        assert _search(driver, BOX)["query"]["box"] == BOX
        tiles = _pick_mode(driver, "tiles")
        assert tiles["query"]["box"][2:] == [224, 224]  # the centre tile answers
        again = _pick_mode(driver, "regions")
        assert again["query"]["box"] == BOX and again["query"]["n_tiles"] == 4
        assert driver.execute_script("return wsi.lastBox") == BOX
        meta = driver.execute_script(
            "return document.querySelector('#results .card.query').textContent"
        )
        assert "query: s1.tiff" in meta and "4 tile(s)" in meta
    finally:
        _pick_mode(driver, "regions")


def _top_in_window(driver: Any, selector: str) -> tuple[float, float]:
    """The top of ``selector``'s element and the window's height (screen px)."""
    top, fold = driver.execute_script(
        "return [document.querySelector(arguments[0]).getBoundingClientRect().top,"
        " window.innerHeight];",
        selector,
    )
    return float(top), float(fold)


def test_a_narrow_window_shows_the_hit_opened_and_the_label_refused(page: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    driver, ids = page["driver"], page["ids"]
    open_on_page(driver, page["url"], ids["s1.tiff"], (800, 900))
    driver.execute_script("document.getElementById('exclude-self').checked = true")
    try:
        answer = _search(driver, BOX)
        assert _top_in_window(driver, "#viewer")[0] < 0  # the results brought into view
        assert answer["hits"][0]["slide_id"] == ids["s2.tiff"]
        card = driver.find_elements(By.CSS_SELECTOR, "#results .card.hit")[0]
        card.find_element(By.CSS_SELECTOR, ".title").click()
        _wait(lambda: driver.execute_script("return wsi.current.slide_id") == ids["s2.tiff"])
        _wait(lambda: page_ready(driver))
        top, fold = _top_in_window(driver, "#viewer")
        assert 0 <= top < fold, (top, fold)

        driver.execute_script("document.getElementById('side').scrollIntoView()")
        label = driver.find_element(By.ID, "label")
        label.clear()
        label.send_keys("=bad")
        card.find_element(By.CSS_SELECTOR, "button.accept").click()
        note = _wait(lambda: card.find_elements(By.CSS_SELECTOR, ".note.error"))[0]
        assert "label: a label may not start with =" in note.text
        top, fold = _top_in_window(driver, "#results .card.hit .note.error")
        assert 0 <= top < fold, (top, fold)
    finally:
        driver.execute_script(
            "document.getElementById('label').value = 'positive';"
            "document.getElementById('exclude-self').checked = false;"
        )


def test_a_store_moved_away_is_said_on_the_page(page: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    driver, ids, root = page["driver"], page["ids"], page["root"]
    s1, s2 = ids["s1.tiff"], ids["s2.tiff"]
    store = root / "slides" / f"{s2}.zarr"
    open_on_page(driver, page["url"], s2, (1400, 900))
    shutil.move(store, page["base"] / "away.zarr")
    status = "const s = document.getElementById('status'); return [s.className, s.textContent];"
    try:
        # the open slide's tiles fetched again (no cache): they fail, and the page says why
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
        driver.execute_script("wsi.viewer.world.getItemAt(0).reset(); wsi.viewer.forceRedraw()")
        _wait(lambda: driver.execute_script(status)[1].startswith(GONE))
        assert driver.execute_script(status)[0] == "error"

        driver.execute_script("openSlide(arguments[0])", s1)
        _wait(
            lambda: (
                driver.execute_script("return wsi.current.slide_id") == s1 and page_ready(driver)
            )
        )
        driver.execute_script("document.getElementById('k').value = '30'")
        answer = _search(driver, [0, 0, 448, 448])
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .card.hit")
        gone = [c for c, h in zip(cards, answer["hits"], strict=True) if h["slide_id"] == s2]
        assert gone
        for card in gone:  # each picture's failure said on its card
            _wait(lambda c=card: c.find_elements(By.CSS_SELECTOR, ".note.error"))
            assert card.find_element(By.CSS_SELECTOR, ".note.error").text.startswith(GONE)
        assert driver.execute_script(status)[0] == ""  # the search's own message
        driver.execute_script("arguments[0].querySelector('button.accept').click()", gone[0])
        _wait(lambda: driver.execute_script(status)[0] == "error")
        assert driver.execute_script(status)[1].startswith(GONE)
        assert not (root / "labels" / "regions.csv").exists()
        assert "accepted" not in gone[0].get_attribute("class")

        driver.execute_script("setStatus('')")
        driver.find_element(By.CSS_SELECTOR, f'#slides li[data-slide="{s2}"]').click()
        _wait(lambda: driver.execute_script(status)[0] == "error")
        assert driver.execute_script(status)[1].startswith(GONE)
        assert driver.execute_script("return wsi.current.slide_id") == s1
    finally:
        driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": False})
        driver.execute_script("document.getElementById('k').value = '8'")
        shutil.move(page["base"] / "away.zarr", store)


def test_the_view_is_searched_from_the_keyboard(page: dict[str, Any]) -> None:
    """Without a pointer: the viewer zoomed in from the keyboard ("=" held), then "search the
    view" pressed with Enter, asks about the part of the slide in view (a region could not be
    asked without drawing it)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver, s1 = page["driver"], page["ids"]["s1.tiff"]
    open_on_page(driver, page["url"], s1, (1400, 900))
    button = driver.find_element(By.ID, "search-view")
    boxes = []
    still = "const v = wsi.viewer.viewport; return v.getZoom(true) === v.getZoom(false);"
    for held in (0, 2):
        canvas = driver.find_element(By.CSS_SELECTOR, "#viewer .openseadragon-canvas")
        if held:  # OpenSeadragon zooms about the centre while "=" is held
            ActionChains(driver).key_down("=", canvas).pause(held).key_up("=").perform()
        _wait(lambda: driver.execute_script(still))  # the zoom's animation over
        button.send_keys(Keys.ENTER)
        _wait(lambda: driver.execute_script("return document.body.dataset.state") == "results")
        boxes.append(driver.execute_script("return wsi.answer.query.box"))
    whole, zoomed = boxes
    assert whole == [0, 0, 1000, 800]  # all of the slide in view, clipped to it
    x, y, w, h = zoomed
    assert x > 0 and y > 0 and x + w < 1000 and y + h < 800 and w * h < 1000 * 800 / 2
    assert abs(x + w / 2 - 500) < 20 and abs(y + h / 2 - 400) < 20  # about the slide's centre
    assert driver.execute_script("return wsi.lastBox") == zoomed
