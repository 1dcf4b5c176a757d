"""The storage layer: tile codecs, direct shard writes, catalog and fingerprints."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_ssl.storage import Catalog, fingerprint_file, slide_id_from_fingerprint
from wsi_ssl.storage.codecs import tile_codecs
from wsi_ssl.storage.shards import write_shard


@pytest.mark.parametrize("codec", ["jpeg", "zstd"])
def test_direct_shard_files_equal_zarrs_own(tmp_path: Path, codec: str) -> None:
    """write_shard lays out byte-identical shard files to Zarr's, and Zarr reads them back."""
    rng = np.random.default_rng(0)
    tiles = rng.integers(90, 200, size=(150, 64, 64, 3), dtype=np.uint8)
    arrays = [
        zarr.create_array(
            tmp_path / f"{name}.zarr",
            shape=tiles.shape,
            dtype="uint8",
            chunks=(1, 64, 64, 3),
            shards=(64, 64, 64, 3),
            **tile_codecs(codec, 90),
        )
        for name in ("zarr", "direct")
    ]
    for shard in range(3):
        part = tiles[shard * 64 : (shard + 1) * 64]
        arrays[0][shard * 64 : shard * 64 + len(part)] = part
        write_shard(arrays[1], shard, part)
    for shard in range(3):
        key = f"c/{shard}/0/0/0"
        assert filecmp.cmp(
            tmp_path / "zarr.zarr" / key, tmp_path / "direct.zarr" / key, shallow=False
        )
    back = zarr.open_array(tmp_path / "direct.zarr")[:]
    if codec == "zstd":
        np.testing.assert_array_equal(back, tiles)
    else:
        assert (
            np.abs(back.astype(int) - tiles).mean() < 30
        )  # lossy; uniform noise is its worst case


def test_jpeg_codec_keeps_smooth_tiles_close(tmp_path: Path) -> None:
    y, x = np.mgrid[0:256, 0:256]
    tile = np.stack([128 + 60 * np.sin(x / 20), 100 + 50 * np.cos(y / 15), 180 + 0 * x], -1)
    tile = tile.astype(np.uint8)[None]
    arr = zarr.create_array(
        tmp_path / "t.zarr",
        shape=tile.shape,
        dtype="uint8",
        chunks=(1, 256, 256, 3),
        shards=(1, 256, 256, 3),
        **tile_codecs("jpeg", 90),
    )
    arr[:] = tile
    again = zarr.open_array(tmp_path / "t.zarr")[:]
    assert np.abs(again.astype(int) - tile).max() <= 8
    meta = (tmp_path / "t.zarr" / "zarr.json").read_text()
    assert '"wsi_ssl.jpeg"' in meta and '"quality": 90' in meta


def test_fingerprint_is_content_based(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.svs", tmp_path / "renamed.svs", tmp_path / "c.svs"
    data = np.random.default_rng(1).bytes(3 << 20)
    a.write_bytes(data)
    b.write_bytes(data)
    c.write_bytes(data[:-1] + b"x")
    assert fingerprint_file(a) == fingerprint_file(b) != fingerprint_file(c)
    assert len(slide_id_from_fingerprint(fingerprint_file(a))) == 16


def test_fingerprint_samples_large_files(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(64 << 20)
    before = fingerprint_file(big)
    with open(big, "r+b") as f:
        f.seek(0)
        f.write(b"header changed")
    assert fingerprint_file(big) != before


def test_catalog_round_trip(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.sqlite")
    catalog.upsert(
        slide_id="s1",
        path="/x/a.svs",
        fingerprint="f",
        status="complete",
        n_tiles=5,
        tiling={"mpp": 0.5},
    )
    catalog.upsert(slide_id="s2", path="/x/b.svs", fingerprint="g", status="failed", error="bad")
    again = Catalog(tmp_path / "catalog.sqlite")
    assert [e.slide_id for e in again.entries("complete")] == ["s1"]
    entry = again.get("s2")
    assert entry is not None and entry.error == "bad" and entry.name == "b.svs"
    assert again.get("s1").tiling == {"mpp": 0.5}  # type: ignore[union-attr]
