"""Tile batches for the embedding job: an ``IterableDataset`` over contiguous tile ranges.

Each work unit is ``batch_size`` consecutive tiles of one slide (a batch never spans slides, so
a slide's batches, and therefore its vectors, do not depend on which other slides run with it);
when a slide's tiles to read are given (``tiles[i]``: the tiles QC kept), a unit's ``start`` and
``stop`` are positions in that list.
Worker ``w`` of ``W`` takes units ``w, w + W, ...``; the DataLoader collects from workers in
turn, so batches arrive in unit order. A worker reads a unit with one Zarr slice (whole inner
chunks of the shards, decoded in the worker) and yields a uint8 tensor (B, T, T, 3): the main
process does no per-tile Python work. For the slides marked ``encoded`` whose store is JPEG,
the worker only reads the stored streams and yields them back to back with their sizes; the
main process decodes them on the device (:mod:`wsi_ssl.embedding.decode`). A read error is
yielded as a message for that unit, so one corrupt slide does not stop the loader.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wsi_ssl.errors import TileReadError
from wsi_ssl.storage.slide_store import open_tiles
from wsi_ssl.storage.tile_reader import TileReader

__all__ = ["TileBatch", "TileBatches", "WorkUnit", "make_loader", "work_units"]

_EMPTY = torch.empty(0, dtype=torch.uint8)


class WorkUnit(NamedTuple):
    slide: int  # index into the job's list of tile-array paths
    start: int
    stop: int


class TileBatch(NamedTuple):
    unit: int
    slide: int
    start: int
    tiles: torch.Tensor  # uint8 (B, T, T, 3), the transform's output, or JPEG bytes; empty on error
    error: str  # "" when the read succeeded
    sizes: torch.Tensor = _EMPTY  # bytes of each JPEG stream in ``tiles``; empty when decoded
    error_tiles: tuple[int, int] = (0, 0)  # tile numbers start, stop the read error is about


def work_units(n_tiles: Sequence[int], batch_size: int) -> list[WorkUnit]:
    """Consecutive ranges of ``batch_size`` tiles, slide by slide."""
    return [
        WorkUnit(s, a, min(a + batch_size, n))
        for s, n in enumerate(n_tiles)
        for a in range(0, n, batch_size)
    ]


class TileBatches(IterableDataset[TileBatch]):
    """Batches of stored tiles; ``tile_arrays[i]`` is the path of slide i's ``tiles`` array.

    ``transform`` (e.g. the encoder's :class:`~wsi_ssl.encoders.Preprocess` when the encoder
    runs on the CPU) is applied to each uint8 batch in the worker; ``encoded[i]``: slide i's
    JPEG tiles travel undecoded (stores of other codecs are decoded whatever it says);
    ``tiles[i]``: the sorted tile numbers of slide i to read (None: all).
    """

    def __init__(
        self,
        tile_arrays: Sequence[str],
        units: Sequence[WorkUnit],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        encoded: Sequence[bool] | None = None,
        tiles: Sequence[np.ndarray | None] | None = None,
    ) -> None:
        super().__init__()
        self.tile_arrays = list(tile_arrays)
        self.units = list(units)
        self.transform = transform
        self.encoded = list(encoded) if encoded is not None else [False] * len(self.tile_arrays)
        self.tiles = list(tiles) if tiles is not None else [None] * len(self.tile_arrays)

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self) -> Iterator[TileBatch]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        readers: dict[int, TileReader] = {}
        for k in range(worker, len(self.units), n_workers):
            slide, start, stop = self.units[k]
            chosen = self.tiles[slide]
            rows = np.arange(start, stop) if chosen is None else chosen[start:stop]
            try:
                if slide not in readers:
                    readers.clear()  # one slide open at a time per worker
                    readers[slide] = TileReader(open_tiles(self.tile_arrays[slide]), verify=True)
                reader = readers[slide]
                if self.encoded[slide] and reader.is_jpeg:
                    streams = reader.read_encoded(rows)
                    sizes = torch.tensor([len(b) for b in streams], dtype=torch.int64)
                    data = torch.frombuffer(bytearray(b"".join(streams)), dtype=torch.uint8)
                    yield TileBatch(k, slide, start, data, "", sizes)
                    continue
                batch = self._decoded(reader, rows)
            except Exception as err:  # reported per unit; the job fails only that slide
                if isinstance(err, TileReadError):
                    detail, span = err.detail, err.tiles
                else:  # the unit's tiles (not consecutive where QC-flagged ones are skipped)
                    detail = f"{type(err).__name__}: {err}"
                    span = (int(rows[0]), int(rows[-1]) + 1)
                yield TileBatch(k, slide, start, _EMPTY, detail, error_tiles=span)
                continue
            yield TileBatch(k, slide, start, batch, "")

    def _decoded(self, reader: TileReader, rows: np.ndarray) -> torch.Tensor:
        tiles = reader.read(rows)
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or len(tiles) != len(rows):
            raise ValueError(f"expected uint8 (B, T, T, 3), got {tiles.dtype} {tiles.shape}")
        batch = torch.from_numpy(tiles)
        return self.transform(batch) if self.transform is not None else batch


def make_loader(
    dataset: TileBatches, *, workers: int, pin_memory: bool, prefetch: int
) -> DataLoader[TileBatch]:
    """A DataLoader that passes the worker-made batches through unchanged; its workers
    ignore SIGTERM (:func:`_deaf_to_sigterm`)."""
    kwargs: dict[str, Any] = (
        {
            "prefetch_factor": prefetch,
            "persistent_workers": False,
            "worker_init_fn": _deaf_to_sigterm,
        }
        if workers > 0
        else {}
    )
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=min(workers, max(1, len(dataset))) if workers > 0 else 0,
        pin_memory=pin_memory,
        **kwargs,
    )


def _deaf_to_sigterm(worker_id: int) -> None:
    """A loader worker ignores SIGTERM: the job's process ends it. A batch scheduler (or
    torchrun) sends SIGTERM to the whole process group; a worker killed by it made the
    stopped job's DataLoader raise "worker is killed by signal" on its way out (an
    "Exception ignored" traceback after the report). A worker still ends with its job's
    process (the DataLoader's watchdog), and on Ctrl-C as before. The DataLoader's own
    ``terminate()`` (SIGTERM) of a worker still busy 5 s after it was asked to stop is
    ignored too: such a worker (stuck in a slow read) ends when its current read returns,
    and the job's process, on its exit, waits for it: one batch at most."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
