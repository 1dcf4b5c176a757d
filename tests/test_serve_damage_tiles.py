"""The viewer over stored tiles that rotted on disk, against the real server on loopback: with
the slide file gone the page draws from the store, and a shard whose bytes changed since
tiling still decodes, to wrong pixels, which the DZI tile answered with 200. Now each shard
the page reads is checked against the CRC the tiler recorded, and a damaged one is refused."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import raw, running

from wsi_ssl.config import TilingConfig
from wsi_ssl.embedding import EmbedConfig, embed
from wsi_ssl.search import SearchIndex
from wsi_ssl.serve import create_app
from wsi_ssl.storage import open_store
from wsi_ssl.storage.tile_reader import TileReader
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide

pytest.importorskip("uvicorn")


def _rot_silently(shard: Path, read: TileReader, rows: np.ndarray) -> None:
    """Flip 16 bytes of ``shard`` where its tiles still decode, to other pixels (as bit-rot
    in a JPEG's entropy data does), and check that an unverified read takes them."""
    original = shard.read_bytes()
    before = read.read(rows)
    for offset in range(1000, 4000, 100):
        data = bytearray(original)
        data[offset : offset + 16] = bytes(b ^ 0x55 for b in data[offset : offset + 16])
        shard.write_bytes(data)
        try:
            after = TileReader(read.array).read(rows)
        except Exception:  # this spot breaks the JPEG: try another
            continue
        if not np.array_equal(after, before):
            return
    pytest.fail(f"no spot in {shard} rots silently")


def test_a_rotted_shard_is_refused_not_drawn(tmp_path: Path) -> None:
    slide = write_synthetic_slide(tmp_path / "s.tiff", (1000, 800), seed=1)
    copy = shutil.copy(slide, tmp_path / "copy.tiff")
    tiling = replace(TilingConfig(tile_size=224), tissue_threshold=0.0)  # jpeg tiles
    root = tmp_path / "root"
    sid = tile_slide(copy, root, tiling).details["slide_id"]
    summary = embed(root, "random-cnn", EmbedConfig(batch_size=8, device="cpu", workers=0))
    assert not summary.failed
    store = open_store(root).slide(sid)
    shard = store.path / "tiles" / "c" / "0" / "0" / "0" / "0"
    assert shard.is_file()
    _rot_silently(shard, TileReader(store.tiles), np.arange(len(store.coords)))
    Path(copy).unlink()  # the page draws from the stored tiles

    with running(create_app(SearchIndex.build(root, "random-cnn", kind="flat"))) as base:
        details = json.loads(raw(base, "GET", f"/api/slides/{sid}")[2])
        assert details["source"] == "tiles", details
        tile = details["dzi"].replace(".dzi", "_files/10/0_0.jpeg")  # level 10: full size
        status, headers, body = raw(base, "GET", tile)
    assert status == 500 and headers["content-type"] == "application/json", body[:200]
    answer = json.loads(body)
    assert answer["type"] == "TilesDamagedError"
    assert answer["error"].startswith("copy.tiff: its stored tiles are damaged (")
    assert "the shard's bytes changed since tiling" in answer["error"]
    assert "--verify-tiles" in answer["error"] and str(root) not in answer["error"]
