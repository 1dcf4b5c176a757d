"""TileReader: single tiles straight from the shard files give exactly what Zarr gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import TileReadError
from wsi_ssl.storage import open_store
from wsi_ssl.storage.codecs import tile_codecs
from wsi_ssl.storage.shards import SHARD_CHECKSUMS, shard_checksum
from wsi_ssl.storage.tile_reader import TileReader
from wsi_ssl.tiling.batch import tile_slide


def _array(path: Path | zarr.storage.MemoryStore, codec: str, n: int = 150) -> zarr.Array:
    rng = np.random.default_rng(1)
    # smooth tiles, so JPEG keeps them recognisable
    base = rng.integers(60, 200, size=(n, 1, 1, 3), dtype=np.uint8)
    tiles = np.clip(base + rng.integers(0, 12, size=(n, 32, 32, 3)), 0, 255).astype(np.uint8)
    array = zarr.create_array(
        path,
        shape=tiles.shape,
        dtype="uint8",
        chunks=(1, 32, 32, 3),
        shards=(64, 32, 32, 3),
        **tile_codecs(codec, 90),
    )
    array[:] = tiles
    return array


@pytest.mark.parametrize("codec", ["jpeg", "zstd"])
def test_reads_equal_zarr_in_any_order(tmp_path: Path, codec: str) -> None:
    array = _array(tmp_path / "t.zarr", codec)  # 150 tiles: the last shard is partial
    reader = TileReader(array)
    assert reader._decode is not None  # the direct path, not the fallback
    rows = np.random.default_rng(0).permutation(150)[:100]
    rows = np.concatenate([rows, rows[:5], [149, 0, 64]])  # repeats and shard edges
    expected = np.stack([array[int(r)] for r in rows])
    np.testing.assert_array_equal(reader.read(rows), expected)
    np.testing.assert_array_equal(reader[149], array[149])
    assert reader.read([]).shape == (0, 32, 32, 3)
    with pytest.raises(IndexError):
        reader.read([150])
    with pytest.raises(IndexError):
        reader[-1]
    for not_rows in ([1.5], slice(0, 2)):  # 1.5 read tile 1; a slice failed inside numpy
        with pytest.raises(TypeError, match="tile rows must be whole numbers"):
            reader.read(not_rows)  # type: ignore[arg-type]
    np.testing.assert_array_equal(reader.read(np.array([3], np.uint32)), array[[3]])


def test_other_stores_fall_back_to_zarr() -> None:
    array = _array(zarr.storage.MemoryStore(), "zstd", n=70)
    reader = TileReader(array)
    assert reader._decode is None
    np.testing.assert_array_equal(reader.read([69, 3]), array[[69, 3]])


def test_missing_shard_or_tile_is_damage_not_blank(tmp_path: Path) -> None:
    array = zarr.create_array(
        tmp_path / "t.zarr",
        shape=(130, 8, 8, 3),
        dtype="uint8",
        chunks=(1, 8, 8, 3),
        shards=(64, 8, 8, 3),
        **tile_codecs("zstd", 90),
    )
    array[:64] = 7
    array[64:100] = 9  # shard 1 holds tiles 64..99 only; shard 2 was never written
    reader = TileReader(array)
    assert (reader.read([0, 99]) == [[[[7]]], [[[9]]]]).all()
    assert [p.parts[-4] for p in reader.missing_shards()] == ["2"]
    with pytest.raises(TileReadError, match="shard file is missing"):
        reader[128]
    with pytest.raises(TileReadError, match="never written"):
        reader[100]


def test_corrupt_shard_is_a_tile_read_error(tmp_path: Path) -> None:
    array = _array(tmp_path / "t.zarr", "jpeg")
    shard = tmp_path / "t.zarr" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # inside the index: its checksum no longer matches
    shard.write_bytes(bytes(data))
    with pytest.raises(TileReadError, match="checksum") as err:
        TileReader(array)[70]
    assert str(shard) in str(err.value)
    first = tmp_path / "t.zarr" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(first.read_bytes())
    data[2:40] = b"\0" * 38  # the first tile's JPEG header
    first.write_bytes(bytes(data))
    with pytest.raises(TileReadError, match=r"tiles 0\.\.0 "):
        TileReader(array)[0]
    np.testing.assert_array_equal(TileReader(array)[1], array[1])  # the others still read


def test_verify_refuses_a_shard_whose_bytes_changed_since_tiling(tmp_path: Path) -> None:
    """A flipped bit inside a tile's JPEG data still decodes (to other pixels): only the shard
    checksums recorded at tiling tell; ``verify=True`` refuses that shard's tiles, reads the
    others, and arrays without recorded checksums read as before."""
    array = _array(tmp_path / "t.zarr", "jpeg")
    shards = [tmp_path / "t.zarr" / "c" / str(i) / "0" / "0" / "0" for i in range(3)]
    array.attrs[SHARD_CHECKSUMS] = [shard_checksum(p) for p in shards]
    intact = array[3]
    stream = TileReader(array).read_encoded([3])[0]
    data = shards[0].read_bytes()
    at = data.index(stream) + len(stream) - 40  # in the entropy-coded data, before EOI
    shards[0].write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :])
    assert not np.array_equal(TileReader(array)[3], intact)  # decodes, wrong pixels
    verified = TileReader(array, verify=True)
    with pytest.raises(TileReadError, match=r"tiles 0\.\.63 cannot be read \(the shard's bytes"):
        verified[3]
    np.testing.assert_array_equal(verified[70], array[70])  # another shard: read
    del array.attrs[SHARD_CHECKSUMS]
    np.testing.assert_array_equal(TileReader(array, verify=True)[3], TileReader(array)[3])


def test_real_slide_tiles(tmp_path: Path, cmu_small: Path) -> None:
    """CMU-1-Small-Region tiled into a jpeg store (re-encoded tiles) and a zstd store."""
    for codec in ("jpeg", "zstd"):
        root = tmp_path / codec
        tile_slide(cmu_small, root, TilingConfig(tile_size=224, codec=codec))
        (slide_id,) = open_store(root).slide_ids
        store = open_store(root).slide(slide_id)
        rows = np.arange(store.n_tiles)[::-1]
        np.testing.assert_array_equal(
            TileReader(store.tiles).read(rows), np.asarray(store.tiles[:])[rows]
        )
