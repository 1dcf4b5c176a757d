"""Write one whole shard of the ``tiles`` array straight to its file.

Zarr's generic sharding path costs about 0.35 ms of Python per tile on top of the codec
(benchmarks/RESULTS.md). A tiling task always writes exactly one whole shard of one-tile inner
chunks, so it can encode the tiles itself and lay the shard out as the Zarr v3
``sharding_indexed`` spec says: the encoded inner chunks back to back, then the index
(``offset, nbytes`` as little-endian uint64 per inner chunk, C order, ``2**64 - 1`` for chunks
past the array's end) followed by its CRC32C. Arrays on other stores or with other codecs
fall back to Zarr's own write, and the tests check both paths give identical files.

A tile may also arrive already encoded: a JPEG stream copied from the slide file goes into a
JPEG array as it is (`accepts_jpeg`), since one JPEG per inner chunk is all the codec stores.

`write_shard` returns the CRC32C of the whole shard file as written; the tiling records them
(`SlideStore.write_shard_checksums`) so that ``wsi-ssl check`` finds a shard whose bytes
changed later (`shard_checksum`), and a re-tile that restores those bytes keeps the slide's
embeddings.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import imagecodecs
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.metadata import ArrayV3Metadata
from zarr.storage import LocalStore

from wsi_ssl.storage.atomic import fault_point
from wsi_ssl.storage.codecs import JpegCodec

SHARD_CHECKSUMS = "shard_crc32c"
"""Attribute of a ``tiles`` array: each shard file's CRC32C as tiled, in shard order."""
EMPTY = np.uint64(2**64 - 1)
"""The shard index's offset and size of an inner chunk that was not written."""


def inner_codecs(array: zarr.Array[Any]) -> tuple[Any, ...]:
    """The codecs of the one-tile inner chunks when the layout is the one written here, else ()."""
    metadata = array.metadata
    if (
        not isinstance(array.store, LocalStore)
        or not isinstance(metadata, ArrayV3Metadata)
        or len(metadata.codecs) != 1
    ):
        return ()
    sharding = metadata.codecs[0]
    if not isinstance(sharding, ShardingCodec) or sharding.chunk_shape[0] != 1:
        return ()
    index_ok = (
        sharding.index_location == ShardingCodecIndexLocation.end
        and len(sharding.index_codecs) == 2
        and isinstance(sharding.index_codecs[0], BytesCodec)
        and isinstance(sharding.index_codecs[1], Crc32cCodec)
    )
    return tuple(sharding.codecs) if index_ok else ()


def _inner_encoder(array: zarr.Array[Any]) -> Callable[[np.ndarray], bytes] | None:
    """A function encoding one tile as the array's inner codecs would, or None if unknown."""
    codecs = inner_codecs(array)
    if len(codecs) == 1 and isinstance(codecs[0], JpegCodec):
        return codecs[0].encode_tile
    if len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], ZstdCodec):
        zstd = numcodecs.Zstd(level=codecs[1].level, checksum=codecs[1].checksum)
        return lambda tile: zstd.encode(np.ascontiguousarray(tile).tobytes())
    return None


def inner_decoder(array: zarr.Array[Any]) -> Callable[[bytes], np.ndarray] | None:
    """A function decoding one inner chunk's bytes to its (T, T, 3) tile, or None if unknown."""
    codecs = inner_codecs(array)
    shape = tuple(array.shape[1:])
    if len(codecs) == 1 and isinstance(codecs[0], JpegCodec):
        return lambda data: imagecodecs.jpeg8_decode(data).reshape(shape)
    if len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], ZstdCodec):
        return lambda data: np.frombuffer(imagecodecs.zstd_decode(data), np.uint8).reshape(shape)
    return None


def shard_path(array: zarr.Array[Any], shard: int) -> Path:
    """The file of shard number ``shard`` of a (N, T, T, 3) array on a local store."""
    key = array.metadata.encode_chunk_key((shard, 0, 0, 0))
    return Path(array.store.root) / array.path / key  # type: ignore[attr-defined]


def shard_files(array: zarr.Array[Any]) -> list[Path]:
    """The files of every shard of a local (N, T, T, 3) array, in order, present or not."""
    per_shard = int(array.shards[0]) if array.shards else int(array.chunks[0])
    return [shard_path(array, shard) for shard in range(-(-int(array.shape[0]) // per_shard))]


def accepts_jpeg(array: zarr.Array[Any]) -> bool:
    """Whether `write_shard` can store JPEG streams in ``array`` as they are."""
    codecs = inner_codecs(array)
    return len(codecs) == 1 and isinstance(codecs[0], JpegCodec)


def shard_checksum(path: str | Path) -> int:
    """CRC32C of the file at ``path`` (a shard: a few MB, read whole)."""
    return int(google_crc32c.value(Path(path).read_bytes()))


def read_shard_index(fd: int, per_shard: int) -> np.ndarray | None:
    """The index at the end of the open shard file ``fd``: uint64 (per_shard, 2) offset and
    nbytes of each inner chunk; None when the file is too short or the index fails its CRC32C
    (cut short or altered)."""
    size = per_shard * 16
    length = os.fstat(fd).st_size
    if length < size + 4:
        return None
    tail = os.pread(fd, size + 4, length - size - 4)
    body, crc = tail[:size], tail[size:]
    if len(tail) != size + 4 or google_crc32c.value(body).to_bytes(4, "little") != crc:
        return None
    return np.frombuffer(body, dtype="<u8").reshape(-1, 2)


def shard_index_ok(path: str | Path, per_shard: int) -> bool:
    """Whether the shard file at ``path`` ends with an intact index whose chunks all lie inside
    the file: a cheap test for a shard cut short (reads the index only)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        index = read_shard_index(fd, per_shard)
        body_end = os.fstat(fd).st_size - per_shard * 16 - 4
    finally:
        os.close(fd)
    if index is None:
        return False
    used = index[index[:, 0] != EMPTY]
    return bool((used[:, 0] + used[:, 1] <= body_end).all())


def write_shard(
    array: zarr.Array[Any],
    shard: int,
    tiles: np.ndarray | Sequence[np.ndarray | bytes],
    *,
    folder: int | None = None,
) -> int | None:
    """Write ``tiles`` as shard number ``shard`` of a (N, T, T, 3) tiles array; returns the
    CRC32C of the shard file (None for an array that is not on a local store).

    Items given as bytes are JPEG streams, stored as they are (only where `accepts_jpeg`).
    ``folder``: the array's folder as an open directory fd
    (:func:`~wsi_ssl.storage.writer_token.writing`); the shard goes into that folder even where
    another has been put at its path since. (Zarr's own write, for arrays not laid out as the
    tiling makes them, goes by path.)
    """
    per_shard = array.shards[0]  # type: ignore[index]
    start = shard * per_shard
    encode = _inner_encoder(array)
    if encode is None:
        array[start : start + len(tiles)] = np.stack(tiles)  # type: ignore[arg-type]
        local = isinstance(array.store, LocalStore)
        return shard_checksum(shard_path(array, shard)) if local else None
    blobs = [tile if isinstance(tile, bytes) else encode(tile) for tile in tiles]
    index = np.full((per_shard, 2), EMPTY, dtype="<u8")
    sizes = np.array([len(b) for b in blobs], dtype=np.uint64)
    index[: len(blobs), 1] = sizes
    index[: len(blobs), 0] = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.uint64)
    index_bytes = index.tobytes()
    crc = google_crc32c.value(index_bytes).to_bytes(4, "little")
    data = b"".join([*blobs, index_bytes, crc])
    if folder is not None:
        _land(array, shard, data, folder)
    else:
        root = Path(array.store.root)  # type: ignore[attr-defined]
        own = os.open(root / array.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _land(array, shard, data, own)
        finally:
            os.close(own)
    return int(google_crc32c.value(data))


def _land(array: zarr.Array[Any], shard: int, data: bytes, folder: int) -> None:
    """Put ``data`` in the file of shard ``shard``, relative to the array's folder open as
    ``folder``, through a temporary file beside it."""
    key = array.metadata.encode_chunk_key((shard, 0, 0, 0))
    parent, _, name = key.rpartition("/")
    if parent:
        _makedirs_at(folder, parent)
    tmp = f"{parent}/.{name}.partial" if parent else f".{name}.partial"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666, dir_fd=folder), "wb") as f:
        f.write(data)
    fault_point(shard_path(array, shard))  # tests: kill or fill the disk before a shard lands
    os.replace(tmp, key, src_dir_fd=folder, dst_dir_fd=folder)


def _makedirs_at(folder: int, path: str) -> None:
    """``os.makedirs(path, exist_ok=True)`` for ``path`` relative to the open directory
    ``folder`` (in a folder removed meanwhile: FileNotFoundError)."""
    try:
        os.mkdir(path, dir_fd=folder)
    except FileExistsError:
        return
    except FileNotFoundError:
        head = path.rpartition("/")[0]
        if not head:
            raise
        _makedirs_at(folder, head)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, dir_fd=folder)
