"""Several indexes under one archive, against the real server on loopback: a picture search
follows an index rebuilt under its name with another encoder (it kept the old encoder: 500
until restart), and ``wsi-ssl serve ROOT`` without ``--index`` opens on the index named
"main", else the most recently built, and says so (it exited 2).

The archive: the conftest's ``small_archive`` (random-init CNN, index named by its encoder
id) copied and embedded with the random-init ViT-tiny too."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from serve_helpers import post_json, raw, running

from wsi_ssl.search import SearchIndex
from wsi_ssl.serve import create_app
from wsi_ssl.storage import open_store
from wsi_ssl.storage.index_files import list_indexes, remove_index

pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def two_encoders(small_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``small_archive`` copied and embedded with ``random-vit-tiny`` as well."""
    from wsi_ssl.embedding import EmbedConfig, embed

    root = tmp_path_factory.mktemp("indexes") / "root"
    shutil.copytree(small_archive, root)
    summary = embed(root, "random-vit-tiny", EmbedConfig(batch_size=8, device="cpu", workers=0))
    assert not summary.failed
    return root


@pytest.fixture
def root(two_encoders: Path, tmp_path: Path) -> Path:
    """A copy of ``two_encoders`` this test may change."""
    copy = tmp_path / "root"
    shutil.copytree(two_encoders, copy)
    return copy


def _tile_png(root: Path) -> tuple[bytes, str, tuple[int, int]]:
    """The PNG of a stored tile (the most tissue of the first slide), its slide and x, y."""
    archive = open_store(root)
    store = archive.slide(archive.slide_ids[0])
    row = int(np.argmax(store.tissue_fraction))
    buf = io.BytesIO()
    Image.fromarray(np.asarray(store.tiles[row])).save(buf, format="PNG")
    x, y = (int(v) for v in store.coords[row])
    return buf.getvalue(), store.slide_id, (x, y)


def _picture_search(base: str, png: bytes) -> dict[str, Any]:
    status, _, body = raw(
        base, "POST", "/api/search/image?k=3&mode=tiles", png, {"Content-Type": "image/png"}
    )
    answer = json.loads(body)
    assert status == 200, answer
    return dict(answer)


def _check_searches(base: str, root: Path, encoder_id: str) -> None:
    """A picture of a stored tile finds that tile (score 1: embedded by ``encoder_id``, the
    index's encoder), and a region search answers from the same index."""
    png, slide, (x, y) = _tile_png(root)
    answer = _picture_search(base, png)
    assert answer["index"]["encoder_id"] == encoder_id
    best = answer["hits"][0]
    assert (best["slide_id"], best["x"], best["y"]) == (slide, x, y)
    assert best["score"] == pytest.approx(1.0, abs=1e-3)
    body = {"slide": slide, "box": [x, y, 224, 224], "k": 2}
    status, found = post_json(base, "/api/search", body)
    assert status == 200 and found["index"]["encoder_id"] == encoder_id


def test_picture_search_follows_an_index_rebuilt_with_another_encoder(root: Path) -> None:
    built = SearchIndex.build(root, "random-cnn", name="main", kind="flat")
    with running(create_app(SearchIndex.open(root, "main"))) as base:
        _check_searches(base, root, built.encoder_id)  # the encoder is created and kept
        for encoder in ("random-vit-tiny", "random-cnn"):  # rebuilt under the same name
            built = SearchIndex.build(root, encoder, name="main", kind="flat")
            _check_searches(base, root, built.encoder_id)


def test_the_default_index_is_main_else_the_newest(root: Path) -> None:
    from wsi_ssl.serve.indexes import default_index

    (only,) = list_indexes(root)
    chosen = default_index(root)
    assert chosen is not None and (chosen.name, chosen.reason) == (only, "the only one")
    assert default_index(root.parent / "nowhere") is None
    picked = []
    for name, encoder in (("zeta", "random-vit-tiny"), ("alpha", "random-cnn")):
        SearchIndex.build(root, encoder, name=name, kind="flat")
        picked.append(default_index(root))
    assert [(p.name, p.reason) for p in picked if p] == [
        ("zeta", "the most recently built"),
        ("alpha", "the most recently built"),
    ]
    SearchIndex.build(root, "random-vit-tiny", name="main", kind="flat")
    SearchIndex.build(root, "random-cnn", name="zeta", kind="flat")  # rebuilt after main
    chosen = default_index(root)
    assert chosen is not None and (chosen.name, chosen.reason) == ("main", "the one named main")
    assert remove_index(root, "main")
    chosen = default_index(root)  # zeta, rebuilt last; alpha was built before it
    assert chosen is not None and chosen.name == "zeta"


@contextlib.contextmanager
def _serve(root: Path, *args: str) -> Iterator[tuple[list[str], str]]:
    """``wsi-ssl serve ROOT --port 0 ARGS`` in a process: its first two lines and base URL;
    stopped with Ctrl+C (exit 0) after the block."""
    cmd = [sys.executable, "-m", "wsi_ssl.cli.main", "serve", str(root), "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert "serving index" in lines[0], proc.stderr.read() if proc.poll() is not None else ""
        base = lines[0].split(" at ")[1].split()[0].rstrip("/")
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(base + "/api/index", timeout=5).close()
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "server did not answer"
                time.sleep(0.1)
        yield lines, base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert code == 0


def test_cli_serves_several_indexes_without_index_option(root: Path) -> None:
    first = list_indexes(root)[0]
    SearchIndex.build(root, "random-vit-tiny", name="main", kind="flat")
    SearchIndex.build(root, "random-cnn", name="later", kind="flat")
    with _serve(root) as (lines, base):
        assert lines[0].startswith("serving index main (")
        assert lines[1].startswith("index main opens the page (the one named main); ")
        assert f"offers the others too: later, {first} (--index NAME" in lines[1]
        info = json.loads(raw(base, "GET", "/api/index")[2])
        assert info["name"] == "main" and info["encoder_id"].startswith("random-vit-tiny")
        assert [i["name"] for i in info["indexes"]] == ["later", "main", first]
    with _serve(root, "--index", first) as (lines, base):
        assert lines[0].startswith(f"serving index {first} (")
        assert lines[1].strip() == "the page's index choice offers the others too: later, main"
        assert json.loads(raw(base, "GET", "/api/index")[2])["name"] == first
    assert remove_index(root, "main")
    with _serve(root) as (lines, base):
        assert lines[0].startswith("serving index later (")
        assert lines[1].startswith("index later opens the page (the most recently built); ")
        assert (
            lines[1].rstrip().endswith(f"the other too: {first} (--index NAME opens it on another)")
        )
        assert json.loads(raw(base, "GET", "/api/index")[2])["name"] == "later"
