"""The pathologist's page in a real browser: headless Chromium (Debian's chromium and
chromium-driver, through Selenium) against the real server on loopback, over a copy of the
serve archive (CMU-1-Small-Region, its twin, a synthetic slide). Each state is kept as a
screenshot under the test's folder (``tmp_path/shots``) for inspection."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import copy_archive
from PIL import Image
from serve_helpers import browser_paths, chromium, layered_archive, running, wait_until

from wsi_ssl.search import SearchIndex
from wsi_ssl.serve import create_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]
pytest.importorskip("uvicorn")
pytest.importorskip("selenium", reason="selenium is not installed (pip install 'wsi-ssl[dev]')")
if browser_paths() is None:
    pytest.skip(
        "chromium and chromedriver are not installed (scripts/setup.sh: "
        "apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

QUERY_BLUE = np.array([30, 90, 220])
HIT_ORANGE = np.array([230, 120, 20])
IMAGES_LOADED = (
    "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth)"
)


@pytest.fixture(scope="module")
def page_env(
    serve_archive: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    archive = copy_archive(serve_archive, tmp_path_factory.mktemp("browser"))
    ids = archive["ids"]
    labels = archive["root"] / "labels" / "slides.csv"  # the archive's slide labels
    labels.parent.mkdir(exist_ok=True)
    labels.write_text(
        f"slide,label\n{ids['cmu']},tumour\n{ids['twin']},tumour\n{ids['s1']},normal\n"
    )
    with running(create_app(SearchIndex.open(archive["root"]))) as base:
        driver = chromium(tmp_path_factory.mktemp("profile"))
        try:
            yield {"archive": archive, "base": base, "driver": driver}
        finally:
            driver.quit()


_wait = partial(wait_until, timeout=30)


def _state(driver: Any) -> str:
    return str(driver.execute_script("return document.body.dataset.state"))


def _settled(driver: Any) -> bool:
    """Every tile the viewer wants is drawn."""
    return bool(
        driver.execute_script(
            "const v = wsi.viewer; return v.world.getItemCount() > 0 && "
            "v.world.getItemAt(0).getFullyLoaded() && !v.world.needsDraw();"
        )
    )


def _shot(driver: Any, folder: Path, name: str) -> np.ndarray:
    folder.mkdir(exist_ok=True)
    png = driver.get_screenshot_as_png()
    (folder / f"{name}.png").write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _viewer_pixels(driver: Any, screen: np.ndarray) -> np.ndarray:
    r = driver.execute_script(
        "const r = document.getElementById('viewer').getBoundingClientRect();"
        "return [r.left, r.top, r.width, r.height, window.devicePixelRatio];"
    )
    s = r[4]
    x, y, w, h = (round(v * s) for v in r[:4])
    return screen[y + 4 : y + h - 4, x + 4 : x + w - 4]


def _drag_box(driver: Any, box: tuple[int, int, int, int]) -> None:
    """Press "draw a box" and drag over level-0 ``box`` (x, y, w, h) with the mouse."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    x, y, w, h = box
    start, end = driver.execute_script(
        "const vp = wsi.viewer.viewport, P = OpenSeadragon.Point;"
        "const a = vp.imageToViewerElementCoordinates(new P(arguments[0], arguments[1]));"
        "const b = vp.imageToViewerElementCoordinates(new P(arguments[2], arguments[3]));"
        "return [[a.x, a.y], [b.x, b.y]];",
        x,
        y,
        x + w,
        y + h,
    )
    element = driver.find_element(By.ID, "viewer")
    driver.find_element(By.ID, "draw").click()
    rect = element.rect
    chain = ActionChains(driver)
    chain.move_to_element_with_offset(
        element, round(start[0] - rect["width"] / 2), round(start[1] - rect["height"] / 2)
    )
    chain.click_and_hold().move_by_offset(
        round(end[0] - start[0]), round(end[1] - start[1])
    ).release().perform()


def _orange(picture: np.ndarray) -> int:
    """Pixels of the matched tiles' outline colour."""
    return int(np.all(np.abs(picture.astype(int) - HIT_ORANGE) < 30, axis=-1).sum())


def test_page_viewer_search_open_and_label(page_env: dict[str, Any], tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By

    driver, base, archive = page_env["driver"], page_env["base"], page_env["archive"]
    shots = tmp_path / "shots"
    cmu, twin = archive["ids"]["cmu"], archive["ids"]["twin"]

    # 1. the page loads and shows the first slide, drawn from its DZI tiles
    driver.get(base + "/")
    _wait(lambda: _state(driver) == "ready" and _settled(driver))
    current = driver.execute_script("return wsi.current")
    assert current["slide_id"] in archive["ids"].values() and current["source"] == "slide"
    viewer = _viewer_pixels(driver, _shot(driver, shots, "1-loaded"))
    assert viewer.std() > 20  # tissue drawn, not a blank canvas
    assert not driver.get_log("browser") or all(
        "favicon" in e["message"] for e in driver.get_log("browser")
    )
    listed = driver.execute_script(
        "return [...document.querySelectorAll('#slides li')].map(li => li.firstChild.textContent)"
    )
    assert len(listed) == len(archive["ids"]) and listed == sorted(listed, key=str.lower)
    driver.find_element(By.CSS_SELECTOR, f'#slides li[data-slide="{cmu}"]').click()
    _wait(lambda: driver.execute_script("return wsi.current.slide_id") == cmu)
    _wait(lambda: _state(driver) == "ready" and _settled(driver))

    # 2. zoom (wheel) and pan (drag): the viewport moves, finer levels are fetched
    element = driver.find_element(By.ID, "viewer")
    zoom0, centre0 = driver.execute_script(
        "const vp = wsi.viewer.viewport; const c = vp.getCenter(); return [vp.getZoom(), [c.x, c.y]];"
    )
    for _ in range(8):  # the mouse wheel, as the browser delivers it
        ActionChains(driver).scroll_from_origin(
            ScrollOrigin.from_element(element), 0, -120
        ).perform()
        time.sleep(0.15)
    ActionChains(driver).move_to_element(element).click_and_hold().move_by_offset(
        -120, -80
    ).release().perform()
    _wait(lambda: _settled(driver))
    zoom1, centre1 = driver.execute_script(
        "const vp = wsi.viewer.viewport; const c = vp.getCenter(); return [vp.getZoom(), [c.x, c.y]];"
    )
    assert zoom1 > 1.5 * zoom0 and centre1 != centre0
    zoomed = _viewer_pixels(driver, _shot(driver, shots, "2-zoomed"))
    assert zoomed.std() > 20
    driver.execute_script("wsi.viewer.viewport.goHome(true)")
    _wait(lambda: _settled(driver))

    # 3. draw a box over tissue: results, the query box drawn on the slide
    tile = driver.execute_script("return wsi.current.tile_size_level0")
    assert tile > 0
    stored = SearchIndex.open(archive["root"]).query_tile(cmu, (1100, 1500))
    qx, qy = (int(v) for v in stored.tile_coords[0])
    driver.find_element(By.ID, "exclude-self").click()
    _drag_box(driver, (qx, qy, 2 * tile, 2 * tile))
    _wait(lambda: _state(driver) == "results")
    answer = driver.execute_script("return wsi.answer")
    assert answer["mode"] == "regions" and answer["hits"]
    assert answer["hits"][0]["slide_id"] == twin  # same pixels on the twin
    qbox = answer["query"]["box"]
    assert abs(qbox[0] - qx) < tile / 4 and abs(qbox[2] - 2 * tile) < tile / 4
    cards = driver.find_elements(By.CSS_SELECTOR, "#results .card.hit")
    assert len(cards) == len(answer["hits"])
    _wait(lambda: driver.execute_script(IMAGES_LOADED))
    screen = _shot(driver, shots, "3-results")
    blue = np.all(np.abs(_viewer_pixels(driver, screen).astype(int) - QUERY_BLUE) < 40, axis=-1)
    assert blue.sum() > 50  # the query box's outline is on the slide
    assert driver.find_elements(By.CSS_SELECTOR, "#viewer .box.query")
    # results side by side (two columns), each hit's picture with its matched tiles outlined
    lefts = {c.rect["x"] for c in cards[:2]}
    assert len(lefts) == 2 and cards[0].rect["y"] == cards[1].rect["y"]
    card_picture = cards[0].find_element(By.TAG_NAME, "img").screenshot_as_png
    assert _orange(np.asarray(Image.open(io.BytesIO(card_picture)).convert("RGB"))) > 50
    ranking = driver.find_elements(By.CSS_SELECTOR, "#slide-ranking li")
    assert [li.get_attribute("data-slide") for li in ranking] == [
        s["slide_id"] for s in answer["slides"]
    ]
    assert ranking and ranking[0].get_attribute("data-slide") == twin

    # 4. a click on the best hit opens the twin at the hit, its box marked
    cards[0].find_element(By.TAG_NAME, "img").click()
    _wait(lambda: driver.execute_script("return wsi.current.slide_id") == twin)
    _wait(lambda: _state(driver) == "ready" and _settled(driver))
    hit_box = answer["hits"][0]["box"]
    bounds = driver.execute_script(
        "const b = wsi.viewer.viewport.viewportToImageRectangle(wsi.viewer.viewport.getBounds());"
        "return [b.x, b.y, b.width, b.height];"
    )
    assert bounds[0] <= hit_box[0] and bounds[0] + bounds[2] >= hit_box[0] + hit_box[2]
    # zoomed onto the hit (three times its size on the tighter axis), not the whole slide
    assert min(bounds[2] / hit_box[2], bounds[3] / hit_box[3]) < 3.5
    assert driver.find_elements(By.CSS_SELECTOR, "#viewer .box.hit")
    _shot(driver, shots, "4-hit-opened")

    # 5. accept the best hit, reject the second: the label files are written
    cards = driver.find_elements(By.CSS_SELECTOR, "#results .card.hit")
    cards[0].find_element(By.CSS_SELECTOR, "button.accept").click()
    _wait(lambda: "accepted" in cards[0].get_attribute("class"))
    cards[1].find_element(By.CSS_SELECTOR, "button.reject").click()
    _wait(lambda: "rejected" in cards[1].get_attribute("class"))
    _shot(driver, shots, "5-labelled")
    labels = archive["root"] / "labels"
    with (labels / "regions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {
            "slide": twin,
            "x": str(hit_box[0]),
            "y": str(hit_box[1]),
            "w": str(hit_box[2]),
            "h": str(hit_box[3]),
            "label": "positive",
        }
    ]
    features = json.loads((labels / "geojson" / f"{twin}.geojson").read_text())["features"]
    x, y, w, h = hit_box
    assert features[0]["geometry"]["coordinates"] == [
        [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
    ]
    assert features[0]["properties"]["classification"]["name"] == "positive"
    with (labels / "rejected.csv").open() as f:
        assert [r["slide"] for r in csv.DictReader(f)] == [answer["hits"][1]["slide_id"]]
    assert driver.find_elements(By.CSS_SELECTOR, "#viewer .box.accepted")
    driver.find_element(By.ID, "concept").click()  # the concept map over the open slide
    _wait(
        lambda: driver.execute_script(
            "const i = document.querySelector('#viewer img.concept');"
            "return i && i.complete && i.naturalWidth > 0;"
        )
    )
    _shot(driver, shots, "5b-concept-map")
    driver.find_element(By.ID, "concept").click()

    # 6. more like these: tiles like the accepted region, none inside a labelled one
    driver.find_element(By.ID, "more").click()
    _wait(
        lambda: (
            _state(driver) == "results"
            and driver.execute_script("return wsi.answer.query.regions === 1")
        )
    )
    more = driver.execute_script("return wsi.answer")
    assert more["mode"] == "tiles" and more["hits"]
    for hit in more["hits"]:
        tx, ty, size, _ = hit["tile_box"]
        inside = (
            hit["slide_id"] == twin and x <= tx + size / 2 < x + w and y <= ty + size / 2 < y + h
        )
        assert not inside
    _wait(lambda: driver.execute_script(IMAGES_LOADED))
    _shot(driver, shots, "6-more-like-these")


def test_page_filters_layers_ranking_and_upload(page_env: dict[str, Any], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from wsi_ssl.storage import open_store

    driver, base, archive = page_env["driver"], page_env["base"], page_env["archive"]
    shots = tmp_path / "shots"
    cmu, s1 = archive["ids"]["cmu"], archive["ids"]["s1"]
    driver.get(base + "/")
    _wait(lambda: _state(driver) == "ready" and _settled(driver))
    driver.find_element(By.CSS_SELECTOR, f'#slides li[data-slide="{cmu}"]').click()
    _wait(lambda: driver.execute_script("return wsi.current.slide_id") == cmu)
    _wait(lambda: _state(driver) == "ready" and _settled(driver))

    # 1. the label filter: only slides labelled "normal" (s1) in the hits and the ranking
    assert driver.find_element(By.ID, "label-choice").is_displayed()
    Select(driver.find_element(By.ID, "label-filter")).select_by_value("normal")
    stored = SearchIndex.open(archive["root"]).query_tile(cmu, (1100, 1500))
    qx, qy = (int(v) for v in stored.tile_coords[0])
    tile = driver.execute_script("return wsi.current.tile_size_level0")
    _drag_box(driver, (qx, qy, 2 * tile, 2 * tile))
    _wait(lambda: _state(driver) == "results")
    answer = driver.execute_script("return wsi.answer")
    assert answer["labels"] == ["normal"] and answer["hits"]
    assert {h["slide_id"] for h in answer["hits"]} == {s1}
    ranking = driver.find_elements(By.CSS_SELECTOR, "#slide-ranking li")
    assert [li.get_attribute("data-slide") for li in ranking] == [s1]
    assert "[normal]" in ranking[0].text
    _wait(lambda: driver.execute_script(IMAGES_LOADED))
    _shot(driver, shots, "1-filtered")

    # 1b. a small viewer of the best hit in its card: fitted around the hit, its tiles outlined
    first = driver.find_element(By.CSS_SELECTOR, "#results .card.hit")
    first.find_element(By.CSS_SELECTOR, "button.zoom").click()
    _wait(
        lambda: driver.execute_script(
            "const v = wsi.minis[0]; return v && v.world.getItemCount() > 0 && "
            "v.world.getItemAt(0).getFullyLoaded() && !v.world.needsDraw();"
        )
    )
    hit = answer["hits"][0]
    mini = driver.execute_script(
        "const v = wsi.minis[0], b = v.viewport.viewportToImageRectangle(v.viewport.getBounds());"
        "return [v.currentOverlays.length, [b.x, b.y, b.width, b.height]];"
    )
    assert mini[0] == len(hit["tile_boxes"]) > 0
    hx, hy, hw, hh = hit["box"]
    bx, by, bw, bh = mini[1]
    assert bx <= hx and by <= hy and bx + bw >= hx + hw and by + bh >= hy + hh
    assert min(bw / hw, bh / hh) < 2.5  # around the hit, not the whole slide
    picture = np.asarray(Image.open(io.BytesIO(first.screenshot_as_png)).convert("RGB"))
    assert _orange(picture) > 50 and picture.std() > 20  # tissue drawn, tiles outlined
    assert driver.execute_script("return wsi.current.slide_id") == cmu  # no slide opened
    _shot(driver, shots, "1b-hit-viewer")

    # 2. a click on the ranked slide opens it
    ranking[0].click()
    _wait(lambda: driver.execute_script("return wsi.current.slide_id") == s1)
    _wait(lambda: _state(driver) == "ready" and _settled(driver))

    # 3. the tile QC layer: toggled on, its picture (thumbnail-sized) is laid over the slide
    qc = driver.find_element(By.ID, "layer-qc")
    _wait(lambda: qc.is_enabled())
    before = _viewer_pixels(driver, _shot(driver, shots, "3a-no-layer")).astype(int)
    qc.click()
    loaded = (
        "const i = document.querySelector('#viewer img.layer.qc');"
        "return i && i.complete && i.naturalWidth > 0 && [i.naturalWidth, i.naturalHeight];"
    )
    natural = _wait(lambda: driver.execute_script(loaded))
    _wait(lambda: _settled(driver))
    thumb = open_store(archive["root"]).slide(s1).thumbnail
    assert natural == [thumb.shape[1], thumb.shape[0]]
    after = _viewer_pixels(driver, _shot(driver, shots, "3b-qc-layer")).astype(int)
    assert np.abs(after - before).mean() > 1  # the tint is drawn
    assert "QC:" in driver.find_element(By.ID, "layer-info").text
    qc.click()
    _wait(lambda: not driver.find_elements(By.CSS_SELECTOR, "#viewer img.layer"))

    # 4. search with a picture: a stored tile of s1 uploaded through the file input
    Select(driver.find_element(By.ID, "label-filter")).select_by_value("")
    Select(driver.find_element(By.ID, "mode")).select_by_value("tiles")
    store = open_store(archive["root"]).slide(s1)
    row = int(np.argmax(store.tissue_fraction))
    picture = tmp_path / "tile.png"
    Image.fromarray(np.asarray(store.tiles[row])).save(picture)
    driver.find_element(By.ID, "upload").send_keys(str(picture))
    _wait(
        lambda: (
            _state(driver) == "results"
            and driver.execute_script("return wsi.answer.query.kind") == "image"
        )
    )
    best = driver.execute_script("return wsi.answer.hits[0]")
    assert (best["slide_id"], best["x"], best["y"]) == (s1, *map(int, store.coords[row]))
    _wait(lambda: driver.execute_script(IMAGES_LOADED))
    _shot(driver, shots, "4-picture-search")


@pytest.fixture(scope="module")
def layered_page(
    page_env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """``serve_helpers.layered_archive`` served with its labels and MIL predictions (the
    browser of ``page_env``)."""
    archive = layered_archive(tmp_path_factory.mktemp("layered"))
    app = create_app(
        SearchIndex.open(archive["root"], "first"),
        slide_labels=archive["labels"],
        mil_predictions=archive["run"],
    )
    with running(app) as base:
        yield {**archive, "base": base, "driver": page_env["driver"]}


def _toggle_layer(driver: Any, name: str, shots: Path) -> np.ndarray:
    """Turn layer ``name`` on, wait for its picture, return the viewer's pixels."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, f"layer-{name}")
    _wait(lambda: box.is_enabled())
    box.click()
    _wait(
        lambda: driver.execute_script(
            f"const i = document.querySelector('#viewer img.layer.{name}');"
            "return i && i.complete && i.naturalWidth > 0;"
        )
    )
    _wait(lambda: _settled(driver))
    time.sleep(0.3)  # the overlay is placed on the next animation frame
    return _viewer_pixels(driver, _shot(driver, shots, f"layer-{name}")).astype(int)


def test_page_annotation_and_attention_layers(layered_page: dict[str, Any], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver, base, a = layered_page["driver"], layered_page["base"], layered_page["a"]
    shots = tmp_path / "shots"
    driver.get(base + "/")
    _wait(lambda: _state(driver) == "ready" and _settled(driver))
    driver.find_element(By.CSS_SELECTOR, f'#slides li[data-slide="{a}"]').click()
    _wait(lambda: driver.execute_script("return wsi.current.slide_id") == a)
    _wait(lambda: _state(driver) == "ready" and _settled(driver))
    _wait(lambda: driver.execute_script("return wsi.layers && wsi.layers.slide_id") == a)
    bare = _viewer_pixels(driver, _shot(driver, shots, "no-layer")).astype(int)
    info = driver.find_element(By.ID, "layer-info").text
    assert "classes: stroma, tumour" in info and "MIL: tumour (normal 0.20, tumour 0.80)" in info
    # two indexes: the index choice is shown and lists both
    assert driver.find_element(By.ID, "index-choice").is_displayed()
    options = Select(driver.find_element(By.ID, "index")).options
    assert [o.get_attribute("value") for o in options] == ["first", "second"]

    # annotations: the left half tinted blue (stroma), the right half orange (tumour)
    ann = _toggle_layer(driver, "annotations", shots)
    h, w = ann.shape[:2]
    tint = ann - bare
    left, right = tint[h // 3 : 2 * h // 3, : w // 2], tint[h // 3 : 2 * h // 3, w // 2 :]
    left_where = np.abs(left).sum(axis=-1) > 30
    right_where = np.abs(right).sum(axis=-1) > 30
    assert left_where.mean() > 0.05 and right_where.mean() > 0.05
    # stroma (tab10 blue) raises blue over red; tumour (tab10 orange) raises red over blue
    assert (left[left_where][:, 2] - left[left_where][:, 0]).mean() > 10
    assert (right[right_where][:, 0] - right[right_where][:, 2]).mean() > 10
    driver.find_element(By.ID, "layer-annotations").click()

    # attention: grows with the tile row, so the bottom of the slide is yellower than the top
    att = _toggle_layer(driver, "attention", shots)
    top_rows, bottom_rows = att[: h // 3] - bare[: h // 3], att[2 * h // 3 :] - bare[2 * h // 3 :]
    changed_top = np.abs(top_rows).sum(axis=-1) > 30
    changed_bottom = np.abs(bottom_rows).sum(axis=-1) > 30
    assert changed_bottom.mean() > 0.05
    yellower = lambda d, m: float((d[m][:, :2].mean(1) - d[m][:, 2]).mean()) if m.any() else 0.0  # noqa: E731
    assert yellower(bottom_rows, changed_bottom) > yellower(top_rows, changed_top)


def test_page_keyboard_label_status_and_new_slides(
    page_env: dict[str, Any], tmp_path: Path
) -> None:
    """Tab reaches the slide list and Enter opens a slide, Escape leaves drawing mode; a
    label refused then accepted leaves no stale error; a slide indexed after the page was
    opened joins the list when the window is focused again."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver, base, archive = page_env["driver"], page_env["base"], page_env["archive"]
    root, s1 = archive["root"], archive["ids"]["s1"]
    SearchIndex.open(root, mmap=False).remove(s1)
    try:
        driver.get(base + "/")
        _wait(lambda: _state(driver) == "ready" and _settled(driver))
        listed = driver.execute_script("return wsi.slides.map(s => s.slide_id)")
        assert s1 not in listed and len(listed) == 2
        # keyboard: from the filter box, Tab to the second slide and open it with Enter
        driver.find_element(By.ID, "filter").click()
        ActionChains(driver).send_keys(Keys.TAB, Keys.TAB).perform()
        focused = driver.execute_script("return document.activeElement.dataset.slide")
        assert focused == listed[1]
        ActionChains(driver).send_keys(Keys.ENTER).perform()
        _wait(lambda: driver.execute_script("return wsi.current.slide_id") == listed[1])
        # the list was drawn again (the opened slide marked): the focus stays on that slide
        _wait(lambda: _state(driver) == "ready")
        focused = driver.execute_script("return document.activeElement.dataset.slide")
        assert focused == listed[1]
        chain = ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT)
        chain.perform()  # and moves on from it
        assert driver.execute_script("return document.activeElement.dataset.slide") == listed[0]
        driver.find_element(By.ID, "draw").click()
        assert driver.find_element(By.ID, "draw").get_attribute("aria-pressed") == "true"
        ActionChains(driver).send_keys(Keys.ESCAPE).perform()
        assert driver.find_element(By.ID, "draw").get_attribute("aria-pressed") == "false"
        # a label the server refuses, then one it takes: the error does not stay
        _wait(lambda: _state(driver) == "ready" and _settled(driver))
        tile = driver.execute_script("return wsi.current.tile_size_level0")
        _drag_box(driver, (600, 600, 2 * tile, 2 * tile))
        _wait(lambda: _state(driver) == "results")
        label = driver.find_element(By.ID, "label")
        label.clear()
        label.send_keys("../bad")
        card = driver.find_elements(By.CSS_SELECTOR, "#results .card.hit")[0]
        card.find_element(By.CSS_SELECTOR, "button.accept").click()
        _wait(lambda: driver.find_element(By.ID, "status").get_attribute("class") == "error")
        label.clear()
        label.send_keys("kbd")
        card.find_element(By.CSS_SELECTOR, "button.accept").click()
        _wait(lambda: "accepted" in card.get_attribute("class"))
        status = driver.find_element(By.ID, "status")
        assert status.get_attribute("class") == "" and status.text.startswith("accepted as kbd")
        # the hit cards take the keyboard too: focus one, Enter opens its slide
        hit = driver.execute_script("return wsi.answer.hits[0]")
        driver.execute_script("arguments[0].focus()", card)
        ActionChains(driver).send_keys(Keys.ENTER).perform()
        _wait(lambda: driver.execute_script("return wsi.current.slide_id") == hit["slide_id"])
    finally:
        SearchIndex.open(root, mmap=False).add([s1])  # taken out with remove: named
    driver.execute_script("window.dispatchEvent(new Event('focus'))")
    _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#slides li")) == 3)
    assert driver.find_element(By.CSS_SELECTOR, f'#slides li[data-slide="{s1}"]')


def test_page_notes_hits_on_a_slide_retiled_after_indexing(
    page_env: dict[str, Any], serve_archive: dict[str, Any], tmp_path: Path
) -> None:
    """The twin re-tiled at 256 px before `index --add`: its hit card says so."""
    from conftest import run_cli
    from selenium.webdriver.common.by import By

    driver = page_env["driver"]
    archive = copy_archive(serve_archive, tmp_path)
    root, cmu, twin = archive["root"], archive["ids"]["cmu"], archive["ids"]["twin"]
    index = SearchIndex.open(root)
    path = index.resolve_slide(twin).path
    with running(create_app(index)) as base:
        retile = ["--tile-size", "256", "--no-resume", "--discard-embeddings", "--quiet"]
        code, _, err = run_cli(["tile", path, "--out", str(root), *retile])
        assert code == 0, err
        driver.get(base + "/")
        _wait(lambda: _state(driver) == "ready" and _settled(driver))
        driver.find_element(By.CSS_SELECTOR, f'#slides li[data-slide="{cmu}"]').click()
        _wait(lambda: driver.execute_script("return wsi.current.slide_id") == cmu)
        _wait(lambda: _state(driver) == "ready" and _settled(driver))
        qx, qy = (int(v) for v in index.query_tile(cmu, (1100, 1500)).tile_coords[0])
        _drag_box(driver, (qx, qy, 448, 448))
        _wait(lambda: _state(driver) == "results")
        card = driver.find_element(By.CSS_SELECTOR, f'#results .card.hit[data-slide="{twin}"]')
        note = card.find_element(By.CSS_SELECTOR, ".note").text
        assert "re-tiled after indexing" in note and "index --add" in note
        _shot(driver, tmp_path / "shots", "retiled-note")


def test_page_fits_small_windows(page_env: dict[str, Any], tmp_path: Path) -> None:
    """At 1024 x 768 and 800 x 600 the viewer takes most of the window's width and half its
    height or more, wholly above the fold (at 800 px it was 70 % of the height, but its lower
    part was below the fold, under the slide list), the page has no horizontal scrollbar, and
    the results panel lies within the window's width."""
    driver, base = page_env["driver"], page_env["base"]
    try:
        for width, height in ((1024, 768), (800, 600)):
            driver.set_window_size(width, height)
            driver.get(base + "/")
            _wait(lambda: _state(driver) == "ready" and _settled(driver))
            sizes = driver.execute_script(
                "const v = document.getElementById('viewer').getBoundingClientRect();"
                "const s = document.getElementById('side').getBoundingClientRect();"
                "const d = document.documentElement;"
                "return [v.width, v.height, window.innerWidth, window.innerHeight,"
                " d.scrollWidth - d.clientWidth, s.left, s.right, v.bottom];"
            )
            vw, vh, iw, ih, overflow, side_left, side_right, bottom = sizes
            _shot(driver, tmp_path / "shots", f"window-{width}")
            assert vw >= 0.7 * iw and vh >= 0.5 * ih and bottom <= ih, sizes
            assert overflow <= 0 and side_left >= 0 and side_right <= iw + 1, sizes
            viewer = _viewer_pixels(driver, _shot(driver, tmp_path / "shots", f"w-{width}"))
            assert viewer.std() > 20  # the slide is drawn there
    finally:
        driver.set_window_size(1400, 900)


@pytest.fixture(scope="module")
def dup_page(
    page_env: dict[str, Any], small_archive: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """``test_serve_labels.dup_archive`` (two slides filed as s1.tiff; indexes: the default
    and "only") served, with the browser of ``page_env``."""
    from test_serve_labels import dup_archive

    archive = dup_archive(small_archive, tmp_path_factory.mktemp("dup-page"))
    with running(create_app(SearchIndex.open(archive["root"], archive["name"]))) as base:
        yield {**archive, "base": base, "driver": page_env["driver"]}


def test_page_names_index_choice_and_concept_errors(dup_page: dict[str, Any]) -> None:
    """Slides sharing a file name are told apart by a short id on result cards and in the
    slide ranking; "more like these" searches the index picked in the menu; a concept map
    the server refuses shows the server's reason in the status line."""
    from conftest import run_cli
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    from serve_helpers import post_json

    from wsi_ssl.storage import open_store

    driver, base, root, ids = (
        dup_page["driver"],
        dup_page["base"],
        dup_page["root"],
        dup_page["ids"],
    )
    s1, s2, dup = ids["s1"], ids["s2"], ids["dup"]
    driver.get(base + "/")
    _wait(lambda: _state(driver) == "ready" and _settled(driver))
    driver.execute_script("openSlide(arguments[0])", s2)
    _wait(lambda: driver.execute_script("return wsi.current.slide_id") == s2)
    _wait(lambda: _state(driver) == "ready" and _settled(driver))
    driver.execute_script("document.getElementById('k').value = 30; search([0, 0, 600, 600])")
    _wait(lambda: _state(driver) == "results")
    ranking = {
        li.get_attribute("data-slide"): li.text
        for li in driver.find_elements(By.CSS_SELECTOR, "#slide-ranking li")
    }
    assert {s1, dup} <= set(ranking)
    assert ranking[s1].startswith(f"s1.tiff ({s1[:8]})") and f"({dup[:8]})" in ranking[dup]
    assert ranking[s2].startswith("s2.tiff:")  # a name no other slide has: as it is
    titles = {}
    for card in driver.find_elements(By.CSS_SELECTOR, "#results .card.hit"):
        titles.setdefault(
            card.get_attribute("data-slide"), card.find_element(By.CLASS_NAME, "title").text
        )
    for slide in {s1, dup} & set(titles):
        assert titles[slide].endswith(f"s1.tiff ({slide[:8]})")
    if s2 in titles:
        assert titles[s2].endswith(" s2.tiff")
    # the index menu: "more like these" searches the index picked there
    assert driver.find_element(By.ID, "index-choice").is_displayed()
    Select(driver.find_element(By.ID, "index")).select_by_value("only")
    _wait(lambda: driver.execute_script("return wsi.answer && wsi.answer.index.name") == "only")
    _wait(lambda: _state(driver) == "results")
    driver.find_elements(By.CSS_SELECTOR, "#results .card.hit button.accept")[0].click()
    _wait(lambda: driver.execute_script("return wsi.labels.accepted.length") == 1)
    driver.find_element(By.ID, "more").click()
    _wait(
        lambda: (
            _state(driver) == "results"
            and driver.execute_script("return wsi.answer.query.regions") == 1
        )
    )
    more = driver.execute_script("return wsi.answer")
    assert more["index"]["name"] == "only" and {h["slide_id"] for h in more["hits"]} == {s2}
    # a concept map the server cannot draw (its one region's slide re-tiled): the reason shown
    x, y = (int(v) for v in open_store(root).slide(dup).coords[0])
    status, _ = post_json(
        base, "/api/labels", {"slide": dup, "box": [x, y, 224, 224], "label": "lost"}
    )
    assert status == 200
    path = SearchIndex.open(root, dup_page["name"]).resolve_slide(dup).path
    retile = ["--tile-size", "256", "--no-resume", "--discard-embeddings", "--quiet"]
    code, _, err = run_cli(["tile", path, "--out", str(root), *retile])
    assert code == 0, err
    driver.get(base + "/")
    _wait(lambda: _state(driver) == "ready" and _settled(driver))
    driver.execute_script(
        "const l = document.getElementById('label'); l.value = 'lost';"
        "l.dispatchEvent(new Event('change'));"
    )
    driver.find_element(By.ID, "concept").click()
    status_line = driver.find_element(By.ID, "status")
    _wait(lambda: status_line.get_attribute("class") == "error")
    assert status_line.text.startswith("concept map: none of the 1 accepted region(s) labelled")


def test_page_on_an_index_without_slides(dup_page: dict[str, Any]) -> None:
    """An index whose only slide was removed: the page says so and how to add slides."""
    from selenium.webdriver.common.by import By

    driver, root, s2 = dup_page["driver"], dup_page["root"], dup_page["ids"]["s2"]
    SearchIndex.build(root, "random-cnn", name="lonely", kind="flat", slides=[s2])
    SearchIndex.open(root, "lonely", mmap=False).remove(s2)
    with running(create_app(SearchIndex.open(root, "lonely"))) as base:
        driver.get(base + "/")
        _wait(lambda: _state(driver) != "loading")
        assert _state(driver) == "empty"
        text = driver.find_element(By.ID, "status").text
        assert "Index lonely holds no slide" in text and "wsi-ssl index ROOT --add" in text
