"""What the server refuses, and how it says so, against the real server on loopback over a
copy of the serve archive: labels a spreadsheet would take for a formula (they were written to
labels/regions.csv as they were), boxes without area in every search mode (tiles mode searched
them), and a search on a slide re-tiled since indexing (the 409 named the store and said
"no complete embeddings")."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_archive, run_cli
from serve_helpers import post_json, running

from wsi_ssl.search import SearchIndex
from wsi_ssl.serve import create_app
from wsi_ssl.storage import open_store

pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def site(
    serve_archive: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    archive = copy_archive(serve_archive, tmp_path_factory.mktemp("checks"))
    with running(create_app(SearchIndex.open(archive["root"]))) as base:
        yield {**archive, "base": base}


def _box(root: Path, slide: str) -> list[int]:
    x, y = (int(v) for v in open_store(root).slide(slide).coords[0])
    return [x, y, 448, 448]


def test_labels_starting_like_a_formula_are_refused(site: dict[str, Any]) -> None:
    base, root, cmu = site["base"], site["root"], site["ids"]["cmu"]
    regions = root / "labels" / "regions.csv"
    for label in ('=HYPERLINK("x.example","y")', "+1", "-2+3", "@SUM(A1)", "\t=1", " -x"):
        body = {"slide": cmu, "box": _box(root, cmu), "label": label}
        status, answer = post_json(base, "/api/labels", body)
        assert status == 422, (label, answer)
        assert "label: a label may not start with =, +, - or @" in answer["error"]
        assert not regions.exists()
        status, answer = post_json(base, "/api/labels/more", {"label": label})
        assert status == 422 and "may not start with" in answer["error"]
    status, answer = post_json(
        base, "/api/labels", {"slide": cmu, "box": _box(root, cmu), "label": "a=b+c @2"}
    )
    assert status == 200, answer
    with regions.open(encoding="utf-8", newline="") as f:
        assert [r["label"] for r in csv.DictReader(f)] == ["a=b+c @2"]


def test_boxes_without_area_are_refused_in_every_mode(site: dict[str, Any]) -> None:
    base, root, cmu = site["base"], site["root"], site["ids"]["cmu"]
    x, y, _, _ = _box(root, cmu)
    for mode in ("tiles", "regions", "slides"):
        for box in ([x, y, 0, 224], [x, y, 224, -5]):
            body = {"slide": cmu, "box": box, "mode": mode}
            status, answer = post_json(base, "/api/search", body)
            assert status == 400, (mode, box, answer)
            assert answer["error"] == (
                f"{cmu}: box {','.join(map(str, box))} has no area; width and height must be > 0"
            )


def test_searching_a_slide_retiled_since_indexing_says_what_to_run(
    serve_archive: dict[str, Any], tmp_path: Path
) -> None:
    archive = copy_archive(serve_archive, tmp_path)
    root, twin = archive["root"], archive["ids"]["twin"]
    index = SearchIndex.open(root)
    entry = index.resolve_slide(twin)
    with running(create_app(index)) as base:
        retile = ["--tile-size", "256", "--no-resume", "--discard-embeddings", "--quiet"]
        code, _, err = run_cli(["tile", entry.path, "--out", str(root), *retile])
        assert code == 0, err
        x, y = (int(v) for v in index.coords[entry.offset])
        for mode in ("tiles", "regions", "slides"):
            body = {"slide": twin, "box": [x, y, 512, 512], "mode": mode}
            status, answer = post_json(base, "/api/search", body)
            assert status == 409, answer
            assert answer["type"] == "TilingMismatchError"
            assert answer["error"] == (
                f"{entry.name} was re-tiled after indexing (index {index.name} holds its old "
                "tiles); run `wsi-ssl embed` and `wsi-ssl index --add` to search its new tiles"
            )
