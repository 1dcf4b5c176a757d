"""The page in headless Chromium against the real server on loopback, over a copy of the small
archive (s1.tiff 1000 x 800, s2.tiff 800 x 700) with MIL predictions of s1 (attention growing
with the tile row, as `wsi-ssl mil predict` writes them):

* the MIL attention layer has a legend while it is shown: its colours, least to most
  attended, are the layer picture's own (it had none, and its red read as QC's "flagged");
* "more like these" heads its results with what they are (tiles like the accepted regions),
  and the "show" menu changed afterwards says it applies to the next box drawn, the results
  left as they are; the next box searches with the menu's choice;
* the query card's picture outlines the query's tiles in the query colour (``--query``), as the
  viewer outlines the query box (they were in the hits' orange)."""

from __future__ import annotations

import io
import re
import shutil
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serve_helpers import (
    browser_paths,
    chromium,
    open_on_page,
    post_json,
    raw,
    running,
    wait_until,
)

from wsi_ssl.search import SearchIndex
from wsi_ssl.serve import create_app
from wsi_ssl.storage import open_store

pytestmark = [pytest.mark.browser]
pytest.importorskip("uvicorn")
pytest.importorskip("selenium")
if browser_paths() is None:
    pytest.skip("chromium and chromedriver are not installed", allow_module_level=True)

_wait = partial(wait_until, timeout=60)
BOX = [224, 224, 448, 448]


@pytest.fixture(scope="module")
def page(small_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Chromium and the server over a copy of the small archive with MIL predictions of s1;
    ``ids`` by file name, ``attention`` s1's tile attention (growing with the tile row)."""
    from wsi_ssl.mil.explain import attention_geojson

    base = tmp_path_factory.mktemp("details_page")
    root = base / "root"
    shutil.copytree(small_archive, root)
    index = SearchIndex.open(root)
    ids = {s["name"]: s["slide_id"] for s in index.slides}
    store = open_store(root).slide(ids["s1.tiff"])
    attention = np.linspace(1.0, 2.0, store.n_tiles)
    attention /= attention.sum()
    preds = base / "predictions"
    attention_geojson(store, attention, preds / "geojson" / f"{store.slide_id}.geojson")
    (preds / "predictions.csv").write_text(
        "slide_id,name,n_tiles,predicted,prob_normal,prob_tumour,heatmap,gallery,geojson\n"
        f"{store.slide_id},s1.tiff,{store.n_tiles},tumour,0.2,0.8,,,"
        f"geojson/{store.slide_id}.geojson\n"
    )
    with running(create_app(index, mil_predictions=preds)) as url:
        driver = chromium(base / "profile")
        try:
            yield {"driver": driver, "url": url, "ids": ids, "store": store}
        finally:
            driver.quit()


def _rgba(css: str) -> list[tuple[int, int, int, float]]:
    """The colours of a CSS ``linear-gradient(...)``, in order (alpha 0..1)."""
    out = []
    for match in re.finditer(r"rgba?\(([^)]*)\)", css):
        parts = [float(v) for v in match.group(1).split(",")]
        r, g, b = (round(v) for v in parts[:3])
        out.append((r, g, b, parts[3] if len(parts) == 4 else 1.0))
    return out


def test_the_attention_layer_has_a_legend_of_its_own_colours(page: dict[str, Any]) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By

    driver, store = page["driver"], page["store"]
    open_on_page(driver, page["url"], page["ids"]["s1.tiff"])
    legend = driver.find_element(By.ID, "attention-legend")
    assert not legend.is_displayed()  # the layer is off
    layer = driver.find_element(By.ID, "layer-attention")
    _wait(lambda: layer.is_enabled())
    layer.click()
    src = _wait(
        lambda: driver.execute_script(
            "const i = document.querySelector('#viewer img.layer.attention');"
            "return i && i.complete && i.naturalWidth > 0 && i.src;"
        )
    )
    assert legend.is_displayed()
    assert legend.text.split() == ["low", "high", "attention"]
    ramp = legend.find_element(By.CLASS_NAME, "ramp")
    assert ramp.size["width"] >= 40 and ramp.size["height"] >= 6
    stops = _rgba(ramp.value_of_css_property("background-image"))
    assert len(stops) == 5
    # the layer picture the page laid over the slide: the least and the most attended tiles
    # (the first and the last) in the legend's first and last colours
    status, _, body = raw(page["url"], "GET", src.removeprefix(page["url"]))
    assert status == 200
    picture = np.asarray(Image.open(io.BytesIO(body)).convert("RGBA")).astype(int)
    f = picture.shape[1] / store.source["dimensions"][0]
    centres = ((store.coords + store.tiling["tile_size_level0"] / 2) * f).astype(int)
    centres = np.minimum(centres, [picture.shape[1] - 1, picture.shape[0] - 1])  # edge tiles
    for row, (r, g, b, a) in ((0, stops[0]), (store.n_tiles - 1, stops[-1])):
        x, y = centres[row]
        assert tuple(picture[y, x, :3]) == (r, g, b)
        assert abs(picture[y, x, 3] / 255 - a) < 0.01
    layer.click()
    assert not legend.is_displayed()


def test_more_like_these_says_what_it_shows_and_the_menu_what_it_does(
    page: dict[str, Any],
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver, s1 = page["driver"], page["ids"]["s1.tiff"]
    status, _ = post_json(
        page["url"],
        "/api/labels",
        {"slide": s1, "box": BOX, "label": "lesion", "verdict": "accept"},
    )
    assert status == 200
    open_on_page(driver, page["url"], s1)
    mode = Select(driver.find_element(By.ID, "mode"))
    assert mode.first_selected_option.get_attribute("value") == "regions"
    label = driver.find_element(By.ID, "label")
    label.clear()
    label.send_keys("lesion")
    try:
        driver.find_element(By.ID, "more").click()
        _wait(
            lambda: (
                driver.execute_script(
                    "return document.body.dataset.state === 'results' && wsi.answer.query.regions"
                )
                == 1
            )
        )
        more = driver.execute_script("return wsi.answer")
        assert more["mode"] == "tiles" and more["hits"]
        heading = driver.find_element(By.CSS_SELECTOR, "#results .card.query").text
        shown = "tiles like the 1 accepted region(s) labelled lesion"
        assert f"more like these: {shown}" in heading
        assert "the “show” menu applies to the next box you draw" in heading
        assert mode.first_selected_option.get_attribute("value") == "regions"

        # the menu changed: the status line says what it does; nothing is searched again
        mode.select_by_value("slides")
        said = f"show “similar slides”: draw a box to search with it; the results shown are still the {shown}."
        _wait(lambda: driver.find_element(By.ID, "status").text == said)
        time.sleep(0.5)  # a search it would have started
        assert driver.execute_script("return document.body.dataset.state") == "results"
        assert driver.execute_script("return wsi.answer") == more
        assert mode.first_selected_option.get_attribute("value") == "slides"

        # the next box drawn searches with the menu's choice, under its own query card
        driver.execute_script("search(arguments[0])", BOX)
        _wait(
            lambda: (
                driver.execute_script(
                    "return document.body.dataset.state === 'results' && wsi.answer.mode"
                )
                == "slides"
            )
        )
        heading = driver.find_element(By.CSS_SELECTOR, "#results .card.query").text
        assert "query: s1.tiff" in heading and "more like these" not in heading
    finally:
        driver.execute_script(
            "document.getElementById('label').value = 'positive';"
            "document.getElementById('mode').value = 'regions';"
        )


def _colour(css: str) -> tuple[int, int, int]:
    """``#rrggbb`` or ``rgb(r, g, b)`` as integers."""
    css = css.strip()
    if css.startswith("#"):
        r, g, b = (int(css[i : i + 2], 16) for i in (1, 3, 5))
    else:
        r, g, b = (int(v) for v in re.findall(r"\d+", css)[:3])
    return r, g, b


def test_the_query_is_outlined_in_the_query_colour_everywhere(page: dict[str, Any]) -> None:
    """The query card's picture outlines the query's tiles in the colour the viewer outlines
    the query box in (the page's ``--query``), not the hits' (``--hit``)."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    driver, s1 = page["driver"], page["ids"]["s1.tiff"]
    open_on_page(driver, page["url"], s1)
    driver.execute_script("search(arguments[0])", BOX)
    _wait(lambda: driver.execute_script("return document.body.dataset.state") == "results")
    root = "getComputedStyle(document.documentElement).getPropertyValue(arguments[0])"
    query = _colour(driver.execute_script(f"return {root}", "--query"))
    hit = _colour(driver.execute_script(f"return {root}", "--hit"))
    box = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#viewer .box.query"))[0]
    assert _colour(box.value_of_css_property("border-top-color")) == query
    card = driver.find_element(By.CSS_SELECTOR, "#results .card.query")
    assert _colour(card.value_of_css_property("border-top-color")) == query
    src = card.find_element(By.TAG_NAME, "img").get_attribute("src")
    status, _, body = raw(page["url"], "GET", src.removeprefix(page["url"]))
    assert status == 200
    picture = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)
    count = lambda c: int((picture == c).all(axis=-1).sum())  # noqa: E731
    assert count(query) > 100 and count(hit) == 0
