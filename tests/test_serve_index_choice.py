"""The index picked in the page, against the real server on loopback: slides, their pictures,
DZI tiles, layers and searches are looked up in that index, not in the one the server was
started on (they answered 404 for slides only the picked index holds), and in Chromium the
slide list and the header follow the index picked.

The archive: ``test_serve_labels.dup_archive`` (the default index holds s1, s2 and a second
s1.tiff; index ``only`` holds s2) plus index ``lonely``, empty (its one slide removed)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image
from serve_helpers import browser_paths, chromium, post_json, raw, running, wait_until

from wsi_ssl.search import SearchIndex
from wsi_ssl.serve import create_app
from wsi_ssl.storage import open_store

pytest.importorskip("uvicorn")


_wait = partial(wait_until, timeout=60)


@pytest.fixture(scope="module")
def archive(small_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from test_serve_labels import dup_archive

    out = dup_archive(small_archive, tmp_path_factory.mktemp("index-choice"))
    s2 = out["ids"]["s2"]
    SearchIndex.build(out["root"], "random-cnn", name="lonely", kind="flat", slides=[s2])
    SearchIndex.open(out["root"], "lonely", mmap=False).remove(s2)
    return out


def _get(base: str, path: str) -> tuple[int, bytes]:
    status, _, body = raw(base, "GET", path)
    return status, body


def test_slides_pictures_and_searches_follow_the_index_asked_for(archive: dict[str, Any]) -> None:
    """Started on index ``only`` (s2 alone), every request naming the default index reaches
    s1, which only that index holds."""
    root, main, s1 = archive["root"], archive["name"], archive["ids"]["s1"]
    q = f"index={quote(main)}"
    with running(create_app(SearchIndex.open(root, "only"))) as base:
        status, body = _get(base, f"/api/index?{q}")
        assert status == 200 and json.loads(body)["name"] == main
        status, body = _get(base, f"/api/slides?{q}")
        assert status == 200 and len(json.loads(body)) == 3
        assert [s["name"] for s in json.loads(_get(base, "/api/slides")[1])] == ["s2.tiff"]
        status, body = _get(base, f"/api/slides/{s1}?{q}")
        details = json.loads(body)
        assert status == 200 and details["dzi"].endswith(f".dzi?{q}"), details
        status, xml = _get(base, details["dzi"])
        assert status == 200 and b"<Image" in xml
        tile = details["dzi"].replace(".dzi?", "_files/0/0_0.jpeg?")
        status, body = _get(base, tile)
        assert status == 200 and Image.open(io.BytesIO(body)).size == (1, 1)
        status, body = _get(base, f"/api/slides/{s1}/thumbnail.png?{q}")
        thumb = open_store(root).slide(s1).thumbnail
        assert status == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(body))), thumb)
        status, body = _get(base, f"/api/slides/{s1}/layers?{q}")
        assert status == 200 and json.loads(body)["slide_id"] == s1
        x, y = (int(v) for v in open_store(root).slide(s1).coords[0])
        for mode in ("regions", "tiles", "slides"):
            body_ = {"slide": s1, "box": [x, y, 448, 448], "k": 4, "mode": mode, "index": main}
            status, answer = post_json(base, "/api/search", body_)
            assert status == 200, answer
            assert s1 in {h["slide_id"] for h in answer["hits"]}
            for url in [answer["query"]["image"]] + [h["image"] for h in answer["hits"]]:
                status, body = _get(base, url)
                assert status == 200 and body.startswith(b"\x89PNG"), (url, body[:200])
        # the server's own index still refuses s1, by name
        status, _ = _get(base, f"/api/slides/{s1}")
        assert status == 404


@pytest.fixture
def page(archive: dict[str, Any], tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """Chromium on the server started on the empty index ``lonely``."""
    pytest.importorskip("selenium")
    with running(create_app(SearchIndex.open(archive["root"], "lonely"))) as base:
        driver = chromium(tmp_path / "profile")
        try:
            yield driver, base
        finally:
            driver.quit()


@pytest.mark.browser
@pytest.mark.skipif(browser_paths() is None, reason="chromium and chromedriver are not installed")
def test_page_slide_list_header_and_hits_follow_the_index_picked(
    archive: dict[str, Any], page: tuple[Any, str]
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver, base = page
    main, s1, s2 = archive["name"], archive["ids"]["s1"], archive["ids"]["s2"]
    state = lambda: driver.execute_script("return document.body.dataset.state")  # noqa: E731
    listed = lambda: driver.execute_script(  # noqa: E731 (read at once: the list is redrawn)
        "return [...document.querySelectorAll('#slides li')].map(li => li.dataset.slide)"
    )
    header = lambda: driver.execute_script(  # noqa: E731
        "return document.getElementById('index-info').textContent"
    )
    driver.get(base + "/")
    _wait(lambda: state() == "empty")
    assert listed() == [] and header().startswith("index lonely:")
    choice = Select(driver.find_element(By.ID, "index"))
    choice.select_by_value(main)
    _wait(lambda: len(listed()) == 3 and state() == "ready")
    assert header().startswith(f"index {main}:") and "from 3 slides" in header()
    choice.select_by_value("only")
    _wait(lambda: listed() == [s2] and header().startswith("index only:"))
    _wait(lambda: state() == "ready" and driver.execute_script("return wsi.current.slide_id") == s2)
    choice.select_by_value(main)
    _wait(lambda: len(listed()) == 3)
    click = "document.querySelector(arguments[0]).click()"  # at once: lists are redrawn
    driver.execute_script(click, f'#slides li[data-slide="{s1}"]')
    _wait(lambda: driver.execute_script("return wsi.current && wsi.current.slide_id") == s1)
    _wait(lambda: state() == "ready")
    x, y = (int(v) for v in open_store(archive["root"]).slide(s1).coords[0])
    driver.execute_script("search(arguments[0])", [x, y, 448, 448])
    _wait(lambda: state() == "results")
    _wait(
        lambda: driver.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete)"
        )
    )
    loaded = driver.execute_script(
        "return [...document.querySelectorAll('#results .card')].map("
        "c => [c.dataset.slide || 'query', c.querySelector('img').naturalWidth])"
    )
    assert any(slide == s1 for slide, _ in loaded) and all(w > 0 for _, w in loaded), loaded
    # a hit on s1 opens it (the server's own index lacks it)
    driver.execute_script("document.body.dataset.state = 'x'")
    driver.execute_script(click, f'#results .card.hit[data-slide="{s1}"]')
    _wait(lambda: state() == "ready")
    assert driver.execute_script("return wsi.current.slide_id") == s1
    assert driver.find_element(By.ID, "status").get_attribute("class") == ""
    _switch_away_from_the_open_slide(driver, archive, [x, y, 448, 448])


def _switch_away_from_the_open_slide(driver: Any, archive: dict[str, Any], box: list[int]) -> None:
    """s1 open with hits of the default index on screen; a search of s1 under way when index
    ``only`` (s2 alone) is picked: no card, ranking entry or hit of the default index is left
    (nor arrives later: clicking one opened s1 from the old index while searches named the new
    one, "not in index"), s2 opens and its searches name ``only``; ``lonely`` says it is
    empty without sending the user to reload the page (that brings back the server's index)."""
    s1, s2 = archive["ids"]["s1"], archive["ids"]["s2"]
    script = lambda js: driver.execute_script(js)  # noqa: E731
    state = lambda: script("return document.body.dataset.state")  # noqa: E731
    searches = "return performance.getEntriesByType('resource')"
    searches += ".filter(e => e.name.endsWith('/api/search')).length"
    assert script("return document.querySelectorAll('#slide-ranking li').length") > 0
    script("performance.clearResourceTimings(); performance.setResourceTimingBufferSize(10**5)")
    pick = "const m = document.getElementById('index'); m.value = arguments[0]; "
    pick += "m.dispatchEvent(new Event('change'))"
    driver.execute_script(f"search(arguments[1]); {pick}", "only", box)
    _wait(lambda: script("return wsi.current && wsi.current.slide_id") == s2)
    _wait(lambda: state() == "ready" and script(searches) == 1)  # its answer came
    time.sleep(0.3)
    left = "return [...document.querySelectorAll('#results .card, #slide-ranking li')].length"
    assert script(left) == 0 and script("return wsi.answer") is None
    assert driver.execute_script("return wsi.current.index") == "only"
    x, y = (int(v) for v in open_store(archive["root"]).slide(s2).coords[0])
    driver.execute_script("search(arguments[0])", [x, y, 448, 448])
    _wait(lambda: state() == "results")
    assert script("return wsi.answer.index.name") == "only"
    assert set(script("return wsi.answer.hits.map(h => h.slide_id)")) == {s2}
    driver.execute_script(pick, "lonely")
    _wait(lambda: state() == "empty")
    status = script("return document.getElementById('status').textContent")
    assert "--name lonely" in status and "reload" not in status, status
    assert "pick another index" in status and script(left) == 0
    assert s1 not in script("return document.body.innerHTML")
