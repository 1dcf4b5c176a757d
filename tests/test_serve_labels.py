"""The label loop of the web page against the real server on loopback (real archive, real
FAISS): regions on slides that left the index or were re-tiled are skipped, two servers on
one archive keep each other's verdicts, spreadsheet-saved label files are read, "more like
these" and the concept map search the index asked for, QuPath-style labels are taken, and
slide labels naming no slide (or a name two slides share) are reported.

The archive (:func:`dup_archive`): ``small_archive`` plus a third slide whose file is also
named ``s1.tiff`` (another folder, other pixels), so two slides share a name."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from serve_helpers import post_json, raw, running

from wsi_ssl.errors import LabelsError
from wsi_ssl.search import SearchIndex
from wsi_ssl.serve import create_app
from wsi_ssl.serve.labels import LabelBook
from wsi_ssl.storage import open_store

pytest.importorskip("uvicorn")


def dup_archive(source: Path, base: Path) -> dict[str, Any]:
    """``source`` (``small_archive``: s1.tiff, s2.tiff) copied to ``base/root`` plus ``dup``,
    another slide filed as ``s1.tiff``; the default index holds all three, index ``only``
    holds s2 alone. Returns ``root``, the default index's ``name`` and the ids ``s1``, ``s2``,
    ``dup``."""
    from dataclasses import replace

    from wsi_ssl.config import TilingConfig
    from wsi_ssl.embedding import EmbedConfig, embed
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slide

    root = base / "root"
    shutil.copytree(source, root)
    main = SearchIndex.open(root)
    ids = {s["name"].removesuffix(".tiff"): s["slide_id"] for s in main.slides}
    tiling = replace(
        TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=4), tissue_threshold=0.0
    )
    (base / "other").mkdir()
    slide = write_synthetic_slide(base / "other" / "s1.tiff", (900, 700), seed=3)
    ids["dup"] = tile_slide(slide, root, tiling).details["slide_id"]
    embed(root, "random-cnn", EmbedConfig(batch_size=8, device="cpu", workers=0, chunk_rows=4))
    SearchIndex.open(root, main.name, mmap=False).add([ids["dup"]])
    SearchIndex.build(root, "random-cnn", name="only", kind="flat", slides=[ids["s2"]])
    return {"root": root, "ids": ids, "name": main.name}


@pytest.fixture(scope="module")
def dup(small_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return dup_archive(small_archive, tmp_path_factory.mktemp("dup"))


@pytest.fixture(scope="module")
def site(dup: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The server over a copy of ``dup`` (its label files this module's own)."""
    root = tmp_path_factory.mktemp("site") / "root"
    shutil.copytree(dup["root"], root)
    with running(create_app(SearchIndex.open(root, dup["name"]))) as base:
        yield {"root": root, "ids": dup["ids"], "base": base, "name": dup["name"]}


def _box(root: Path, slide_id: str, row: int = 0) -> list[int]:
    """A two-tile box at stored tile ``row`` of the slide."""
    x, y = (int(v) for v in open_store(root).slide(slide_id).coords[row])
    return [x, y, 448, 224]


def _label(base: str, slide: str, box: list[int], label: str, **more: Any) -> tuple[int, Any]:
    return post_json(base, "/api/labels", {"slide": slide, "box": box, "label": label, **more})


def _regions(root: Path) -> list[dict[str, str]]:
    with (root / "labels" / "regions.csv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_regions_on_removed_or_retiled_slides_are_skipped(
    dup: dict[str, Any], tmp_path: Path
) -> None:
    """A region on a slide removed from the index (`index --remove`) still queries with its
    stored vectors; one on a slide re-tiled with --discard-embeddings is skipped, and counted,
    by "more like these" and the concept map of every slide."""
    root = tmp_path / "root"
    shutil.copytree(dup["root"], root)
    s1, s2, other = dup["ids"]["s1"], dup["ids"]["s2"], dup["ids"]["dup"]
    index = SearchIndex.open(root, dup["name"])
    with running(create_app(index)) as base:
        for slide in (s1, s2, other):
            assert _label(base, slide, _box(root, slide), "tumour")[0] == 200
        assert _label(base, s1, _box(root, s1, 1), "gone")[0] == 200
        code, _, err = run_cli(["index", str(root), "--name", dup["name"], "--remove", other])
        assert code == 0, err
        retile = ["--tile-size", "256", "--no-resume", "--discard-embeddings", "--quiet"]
        code, _, err = run_cli(["tile", index.resolve_slide(s1).path, "--out", str(root), *retile])
        assert code == 0, err
        status, answer = post_json(base, "/api/labels/more", {"label": "tumour", "k": 4})
        assert status == 200, answer
        assert answer["query"]["regions"] == 2 and answer["query"]["skipped"] == 1
        assert len(answer["hits"]) == 4 and other not in {h["slide_id"] for h in answer["hits"]}
        status, headers, body = raw(base, "GET", f"/api/slides/{s2}/concept.png?label=tumour")
        assert status == 200 and body.startswith(b"\x89PNG"), body[:300]
        assert headers["x-skipped-regions"] == "1"
        # a label whose every region is unusable: a 400 that says why, not a 404 or 409
        status, answer = post_json(base, "/api/labels/more", {"label": "gone"})
        assert status == 400 and "none of the 1 accepted region(s)" in answer["error"]
        status, _, body = raw(base, "GET", f"/api/slides/{s2}/concept.png?label=gone")
        assert status == 400 and "left the index or were re-tiled" in json.loads(body)["error"]


def _serve_process(root: Path, name: str) -> tuple[subprocess.Popen[str], str]:
    """`wsi-ssl serve ROOT --index NAME --port 0` in its own process, and its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsi_ssl.cli", "serve", str(root), "--index", name, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if found := re.search(r"at (http://127\.0\.0\.1:\d+)/", line):
            return proc, found.group(1)
        assert line or proc.poll() is None, "the server did not start"
    proc.kill()
    raise AssertionError("the server did not start in time")


def test_two_servers_on_one_archive_keep_each_others_labels(
    dup: dict[str, Any], tmp_path: Path
) -> None:
    """Verdicts given alternately (then all at once) through two server processes on one
    archive are all kept, in the CSV, each slide's GeoJSON and each server's answers."""
    root = tmp_path / "root"
    shutil.copytree(dup["root"], root)
    s1, s2 = dup["ids"]["s1"], dup["ids"]["s2"]
    proc, other = _serve_process(root, dup["name"])
    try:
        with running(create_app(SearchIndex.open(root, dup["name"]))) as mine:
            assert _label(mine, s2, _box(root, s2, 0), "a")[0] == 200
            assert _label(other, s2, _box(root, s2, 1), "b")[0] == 200
            assert _label(mine, s1, _box(root, s1, 0), "c", verdict="reject")[0] == 200
            status, _ = post_json(other, "/api/labels", {"slide": s2, "box": [0, 0, 1, 1]})
            assert status == 200  # another accepted box, so the lists below hold 3
            for base in (mine, other):
                labels = json.loads(raw(base, "GET", "/api/labels")[2])
                assert sorted(r["label"] for r in labels["accepted"]) == ["a", "b", "positive"]
                assert [r["label"] for r in labels["rejected"]] == ["c"]
            features = json.loads((root / "labels" / "geojson" / f"{s2}.geojson").read_text())
            names = sorted(f["properties"]["classification"]["name"] for f in features["features"])
            assert names == ["a", "b", "positive"]

            # both at once: 2 x 12 verdicts, none lost
            def burst(base: str, start: int) -> None:
                for i in range(start, start + 12):
                    assert _label(base, s2, [i * 7, 0, 50, 50], "race")[0] == 200

            threads = [threading.Thread(target=burst, args=a) for a in ((mine, 0), (other, 12))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            race = [r for r in _regions(root) if r["label"] == "race"]
            assert sorted(int(r["x"]) for r in race) == [i * 7 for i in range(24)]
            assert len(json.loads(raw(other, "GET", "/api/labels")[2])["accepted"]) == 27
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        proc.kill()
        if proc.stdout:
            proc.stdout.close()


def test_spreadsheet_saved_regions_csv_is_read(dup: dict[str, Any], tmp_path: Path) -> None:
    """A UTF-8 BOM, CRLF line ends and 898.0 in a number column are read; a row that still
    cannot be read stops the server with a LabelsError naming the file, line and remedy."""
    root = tmp_path / "root"
    shutil.copytree(dup["root"], root)
    s2 = dup["ids"]["s2"]
    path = root / "labels" / "regions.csv"
    path.parent.mkdir()
    text = f"slide,x,y,w,h,label\r\n{s2},898.0,10,224.0,224,Tumor: Positive\r\n,,,,,\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert LabelBook(root).accepted == [(s2, 898, 10, 224, 224, "Tumor: Positive")]
    with running(create_app(SearchIndex.open(root, dup["name"]))) as base:
        accepted = json.loads(raw(base, "GET", "/api/labels")[2])["accepted"]
        assert accepted == [
            {"slide": s2, "x": 898, "y": 10, "w": 224, "h": 224, "label": "Tumor: Positive"}
        ]
    for row, problem in ((f"{s2},12.5,0,1,1,x", "12.5"), (f"{s2},1,2,3", "empty")):
        path.write_bytes(b"\xef\xbb\xbf" + (text + row + "\r\n").encode())
        with pytest.raises(LabelsError) as err:
            create_app(SearchIndex.open(root, dup["name"]))
        message = str(err.value)
        assert "regions.csv" in message and "line 4" in message and problem in message
        assert "correct or delete that row" in message and err.value.rows == [4]
    path.write_text(f"Slide;X;Y;W;H;Label\n{s2};1;2;3.0;4;a\n")  # a semicolon-separated save
    assert LabelBook(root).accepted == [(s2, 1, 2, 3, 4, "a")]
    path.write_text("slide,x,y,w,h\n")
    with pytest.raises(LabelsError, match=r"line 1 lacks the column\(s\) label"):
        LabelBook(root)


def test_more_and_concept_map_search_the_index_asked_for(site: dict[str, Any]) -> None:
    """`index` picks the index "more like these" searches and the concept map is scaled on
    (a region on a slide outside that index still queries with its stored vectors)."""
    base, root = site["base"], site["root"]
    s1, s2 = site["ids"]["s1"], site["ids"]["s2"]
    for slide in (s1, s2):
        assert _label(base, slide, _box(root, slide), "picked")[0] == 200
    body = {"label": "picked", "k": 12, "index": "only"}
    status, answer = post_json(base, "/api/labels/more", body)
    assert status == 200, answer
    assert answer["index"]["name"] == "only" and answer["query"]["regions"] == 2
    assert answer["hits"] and {h["slide_id"] for h in answer["hits"]} == {s2}
    status, answer = post_json(base, "/api/labels/more", {"label": "picked", "k": 12})
    assert status == 200 and answer["index"]["name"] == site["name"]
    assert {h["slide_id"] for h in answer["hits"]} - {s2}  # the other slides' tiles too
    url = f"/api/slides/{s2}/concept.png?label=picked"
    status, headers, only = raw(base, "GET", url + "&index=only")
    assert status == 200 and headers["x-skipped-regions"] == "0"
    status, _, default = raw(base, "GET", url)
    assert status == 200 and only != default  # scaled on the tiles of another index
    status, _, body = raw(base, "GET", url + "&index=nope")
    assert status == 404 and json.loads(body)["type"] == "IndexNotFoundError"


def test_qupath_and_non_ascii_labels_are_taken(site: dict[str, Any]) -> None:
    """Labels such as QuPath's derived classes and non-ASCII names are kept as they are in the
    CSV and GeoJSON; control characters, path separators and overlong labels get a message a
    person can act on."""
    base, root, s2 = site["base"], site["root"], site["ids"]["s2"]
    for row, label in enumerate(("Tumor: Positive", "Tumör", "CD8+ (high), 2")):
        status, answer = _label(base, s2, _box(root, s2, row), label)
        assert status == 200, answer
    assert {"Tumor: Positive", "Tumör", "CD8+ (high), 2"} <= {r["label"] for r in _regions(root)}
    features = json.loads((root / "labels" / "geojson" / f"{s2}.geojson").read_text("utf-8"))
    assert "Tumör" in {f["properties"]["classification"]["name"] for f in features["features"]}
    status, _, _ = raw(base, "GET", f"/api/slides/{s2}/concept.png?label=Tum%C3%B6r")
    assert status == 200
    for bad in ("../bad", "a\\b", "line\nbreak", "tab\there", "x" * 65, "  "):
        status, answer = _label(base, s2, _box(root, s2), bad)
        assert status == 422, bad
        assert answer["error"].startswith("label: a label is 1 to 64 characters without control")
        assert "pattern" not in answer["error"] and "^" not in answer["error"]
    status, _, body = raw(base, "GET", f"/api/slides/{s2}/concept.png?label=a%2Fb")
    assert status == 422 and "a label is 1 to 64" in json.loads(body)["error"]


def test_slide_labels_naming_no_slide_or_a_shared_name_are_reported(
    site: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: Any
) -> None:
    """`serve --labels`: a row naming a file name two slides share, or no slide, is left out
    with a warning (logged and on stderr) naming its line; the others are kept."""
    from wsi_ssl.serve.app import read_slide_labels

    labels = tmp_path / "slides.csv"
    labels.write_text("slide,label\ns1.tiff,tumour\nnope.tiff,normal\ns2.tiff,normal\n")
    with caplog.at_level(logging.WARNING, logger="wsi_ssl.serve.app"):
        found = read_slide_labels(SearchIndex.open(site["root"], site["name"]), labels)
    assert found == {site["ids"]["s2"]: "normal"}
    err = capsys.readouterr().err
    for text in (caplog.text, err):
        assert "2 row(s) left out" in text and "line 2" in text and "line 3" in text
        assert "'s1.tiff' names 2 slides in" in text and "'nope.tiff'" in text
    assert "wsi-ssl: warning: slide labels slides.csv" in err
