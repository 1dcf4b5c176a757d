"""Random access to single tiles: read the inner chunk from its shard file and decode it.

Reading one tile through Zarr's sharding codec costs about 1 ms on top of a 0.2 ms JPEG
decode (benchmarks/RESULTS.md). Pretraining and the pictures of search and MIL read tiles
one by one in random order, so for the layout `wsi_ssl.storage.shards` writes (one tile per
inner chunk, index at the end with its CRC32C, local files) :class:`TileReader` reads the shard
index once per shard, then each tile's bytes with one ``pread`` and decodes them with the
array's own inner codec. Any other array (another store, another layout) is read through Zarr.

With ``verify=True`` (the embedding loader, which reads every tile of a shard anyway) each
shard file is read whole once per reader and checked against the CRC32C the tiler recorded
for it (``shard_crc32c``): a tile whose bytes changed since tiling still decodes, to wrong
pixels, and must not be embedded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr

from wsi_ssl.errors import TileReadError
from wsi_ssl.storage.shards import (
    EMPTY,
    SHARD_CHECKSUMS,
    accepts_jpeg,
    inner_decoder,
    read_shard_index,
    shard_files,
    shard_path,
)

__all__ = ["TileReader"]


class TileReader:
    """Tiles of a ``tiles`` array (N, T, T, 3) by row, decoded straight from the shard files.

    Meant for complete stores (a shard's index is cached once read), where every tile was
    written: a missing shard file or tile is damage, a :class:`TileReadError`, never blank
    tiles. Thread-safe for reads.
    """

    def __init__(self, array: zarr.Array[Any], *, verify: bool = False) -> None:
        """Read ``array``; ``verify``: check each shard file against its recorded CRC32C
        before its first tile is read (arrays without recorded checksums are not checked)."""
        self.array = array
        self._decode = inner_decoder(array) if array.dtype == np.uint8 else None
        self._per_shard = int(array.shards[0]) if array.shards else 0
        self._indexes: dict[int, np.ndarray] = {}
        recorded = array.attrs.get(SHARD_CHECKSUMS) if verify else None
        self._checksums = [int(c) for c in recorded] if isinstance(recorded, list) else []
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def _check_bytes(self, shard: int, fd: int, path: Path) -> None:
        """Raise `TileReadError` when shard ``shard``'s file is not what was tiled."""
        if shard in self._verified or shard >= len(self._checksums):
            return
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        if google_crc32c.value(data) != self._checksums[shard]:
            start = shard * self._per_shard
            stop = min(start + self._per_shard, len(self))
            cut = read_shard_index(fd, self._per_shard) is None
            why = " is cut short (no intact index)" if cut else "'s bytes changed since tiling"
            raise TileReadError(path, start, stop, f"the shard{why}")
        self._verified.add(shard)

    def _index(self, shard: int, fd: int, path: Path) -> np.ndarray:
        index = self._indexes.get(shard)
        if index is None:
            index = read_shard_index(fd, self._per_shard)
            if index is None:
                start = shard * self._per_shard
                raise TileReadError(
                    path, start, start + self._per_shard, "the shard index fails its checksum"
                )
            self._indexes[shard] = index
        return index

    def read(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The tiles at ``rows`` (any order, repeats allowed) as uint8 (len(rows), T, T, 3)."""
        rows = self._rows(rows)
        out = np.empty((len(rows), *self.array.shape[1:]), dtype=self.array.dtype)
        if self._decode is None:
            for i, row in enumerate(rows):
                out[i] = self.array[int(row)]
            return out
        for i, path, data in self._stored(rows):
            try:
                out[i] = self._decode(data)
            except Exception as err:
                row = int(rows[i])
                raise TileReadError(path, row, row + 1, f"{type(err).__name__}: {err}") from err
        return out

    @property
    def is_jpeg(self) -> bool:
        """Whether :meth:`read_encoded` gives one JPEG stream per tile."""
        return self._decode is not None and accepts_jpeg(self.array)

    def read_encoded(self, rows: Sequence[int] | np.ndarray) -> list[bytes]:
        """The stored (encoded) bytes of the tiles at ``rows``, for a decoder elsewhere (the
        GPU); only for the layout written here (else a ``ValueError``)."""
        if self._decode is None:
            raise ValueError(f"{self.array.store}: not the one-tile-per-chunk local layout")
        rows = self._rows(rows)
        out: list[bytes] = [b""] * len(rows)
        for i, _, data in self._stored(rows):
            out[i] = data
        return out

    def _rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        given = np.asarray(rows)
        if given.size and given.dtype.kind not in "iu":  # 1.5 was read as row 1
            raise TypeError(
                f"tile rows must be whole numbers (a list, range or integer array); got "
                f"{given.dtype} {rows!r:.60}"
            )
        rows = given.astype(np.int64).reshape(-1)
        n = len(self)
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"tile rows must be in [0, {n}), got {rows.min()}..{rows.max()}")
        return rows

    def _stored(self, rows: np.ndarray) -> Iterator[tuple[int, Path, bytes]]:
        """``(i, shard path, bytes)`` of each ``rows[i]``, one shard file open at a time."""
        n = len(self)
        order = np.argsort(rows, kind="stable")
        shards = rows[order] // self._per_shard
        for shard in np.unique(shards):
            where = order[shards == shard]
            path = shard_path(self.array, int(shard))
            start = int(shard) * self._per_shard
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                stop = min(start + self._per_shard, n)
                raise TileReadError(path, start, stop, "the shard file is missing") from None
            try:
                self._check_bytes(int(shard), fd, path)
                index = self._index(int(shard), fd, path)
                for i in where:
                    offset, nbytes = index[rows[i] - shard * self._per_shard]
                    if offset == EMPTY:
                        first = int(rows[i])
                        raise TileReadError(path, first, first + 1, "the tile was never written")
                    yield int(i), path, os.pread(fd, int(nbytes), int(offset))
            finally:
                os.close(fd)

    def missing_shards(self) -> list[Path]:
        """Shard files of this array that do not exist (empty when complete or not local)."""
        if self._decode is None:
            return []
        return [p for p in shard_files(self.array) if not p.is_file()]

    def __getitem__(self, row: int) -> np.ndarray:
        """One tile, uint8 (T, T, 3)."""
        return np.asarray(self.read([row])[0])
