"""What the server refuses, and how it says so, against the real server on loopback over a
copy of the serve archive: new labels a spreadsheet would take for a formula (they were written
to labels/regions.csv as they were), while such labels the files already hold ("+ve", "-ve")
stay usable (clearing them, "more like these" and their concept map answered 422), boxes
without area in every search mode (tiles mode searched them), and a search on a slide re-tiled
since indexing (the 409 named the store and said "no complete embeddings")."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_archive, run_cli
from serve_helpers import post_json, raw, running

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


def _box(root: Path, slide: str, row: int = 0) -> list[int]:
    x, y = (int(v) for v in open_store(root).slide(slide).coords[row])
    return [x, y, 448, 448]


def test_new_labels_starting_like_a_formula_are_refused(site: dict[str, Any]) -> None:
    base, root, cmu = site["base"], site["root"], site["ids"]["cmu"]
    regions = root / "labels" / "regions.csv"
    for label in ('=HYPERLINK("x.example","y")', "+1", "-2+3", "@SUM(A1)", "\t=1", " -x"):
        for verdict in ("accept", "reject"):
            body = {"slide": cmu, "box": _box(root, cmu), "label": label, "verdict": verdict}
            status, answer = post_json(base, "/api/labels", body)
            assert status == 422, (label, answer)
            assert "label: a label may not start with =, +, - or @" in answer["error"]
            assert not regions.exists()
        status, answer = post_json(base, "/api/labels/more", {"label": label})
        assert status == 400 and "no accepted region has label" in answer["error"]
    status, answer = post_json(
        base, "/api/labels", {"slide": cmu, "box": _box(root, cmu), "label": "a=b+c @2"}
    )
    assert status == 200, answer
    with regions.open(encoding="utf-8", newline="") as f:
        assert [r["label"] for r in csv.DictReader(f)] == ["a=b+c @2"]


def test_labels_the_files_hold_that_start_like_a_formula_keep_working(
    serve_archive: dict[str, Any], tmp_path: Path
) -> None:
    """A regions.csv written before the formula check (or by hand) with "+ve", a rejected.csv
    with "-ve": they load, "more like these" and the concept map of "+ve" answer, "+ve" and
    "-ve" take new verdicts and are cleared; a new formula label is refused, "+ve" included
    once the files no longer hold it."""
    archive = copy_archive(serve_archive, tmp_path)
    root, cmu = archive["root"], archive["ids"]["cmu"]
    boxes = [_box(root, cmu, row) for row in range(4)]
    (root / "labels").mkdir()
    regions, rejected = root / "labels" / "regions.csv", root / "labels" / "rejected.csv"
    for path, box, label in ((regions, boxes[0], "+ve"), (rejected, boxes[1], "-ve")):
        path.write_text(f"slide,x,y,w,h,label\n{cmu},{','.join(map(str, box))},{label}\n")
    with running(create_app(SearchIndex.open(root))) as base:
        status, _, body = raw(base, "GET", "/api/labels")
        held = json.loads(body)
        assert [r["label"] for r in held["accepted"] + held["rejected"]] == ["+ve", "-ve"]
        status, answer = post_json(base, "/api/labels/more", {"label": "+ve", "k": 3})
        assert status == 200 and len(answer["hits"]) == 3, answer
        status, _, body = raw(base, "GET", f"/api/slides/{cmu}/concept.png?label=%2Bve")
        assert status == 200 and body.startswith(b"\x89PNG"), body[:200]
        for box, label, verdict in ((boxes[2], "+ve", "accept"), (boxes[3], "-ve", "reject")):
            body = {"slide": cmu, "box": box, "label": label, "verdict": verdict}
            assert post_json(base, "/api/labels", body)[0] == 200, (label, verdict)
        assert _labels(regions) == ["+ve", "+ve"] and _labels(rejected) == ["-ve", "-ve"]
        for box in boxes:
            body = {"slide": cmu, "box": box, "label": "+ve", "verdict": "clear"}
            status, answer = post_json(base, "/api/labels", body)
            assert status == 200, answer
        assert _labels(regions) == [] and _labels(rejected) == []
        for label in ('=HYPERLINK("x.example","+ve")', "+ve"):
            body = {"slide": cmu, "box": boxes[0], "label": label}
            status, answer = post_json(base, "/api/labels", body)
            assert status == 422 and answer["type"] == "FormulaLabelError", answer
            assert "label: a label may not start with =, +, - or @" in answer["error"]
            assert _labels(regions) == [] and _labels(rejected) == []


def _labels(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        return [r["label"] for r in csv.DictReader(f)]


def test_boxes_without_area_are_refused_in_every_mode(site: dict[str, Any]) -> None:
    base, root, cmu = site["base"], site["root"], site["ids"]["cmu"]
    x, y, _, _ = _box(root, cmu)
    for mode in ("tiles", "regions", "slides"):
        for box in ([x, y, 0, 224], [x, y, 224, -5]):
            body = {"slide": cmu, "box": box, "mode": mode}
            status, answer = post_json(base, "/api/search", body)
            assert status == 400, (mode, box, answer)
            assert answer["error"] == (  # named by file, as the page names it (it said the id)
                f"CMU-1-Small-Region.svs: box {','.join(map(str, box))} has no area; width and "
                "height must be > 0"
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
