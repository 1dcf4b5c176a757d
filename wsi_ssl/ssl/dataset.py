"""Tiles of one or many slide stores as a torch ``Dataset``.

:class:`TileDataset` reads one tile per item from the sharded Zarr ``tiles`` arrays (one tile
per inner chunk, so a read decodes one JPEG). It holds only paths; each process opens its own
array handles on first use, so it is safe in DataLoader worker processes. Items indexed by
``(index, seed)`` (:class:`~wsi_ssl.ssl.sampler.StepBatchSampler`) are augmented under that
seed (:class:`seeded`), so a run is reproducible whatever the number of loader workers. With a
stain normaliser (:class:`wsi_ssl.stain.StainNormalizer`) every tile is mapped to the
reference's stains as it is read, before any augmentation.
"""

from __future__ import annotations

import bisect
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from wsi_ssl.errors import TileReadError, WsiSslError
from wsi_ssl.ssl.stores import SlideEntry
from wsi_ssl.storage import open_store
from wsi_ssl.storage.tile_reader import TileReader

__all__ = ["TileDataset", "seeded"]


class TileDataset(Dataset):
    """Every tile of the given stores, in store order.

    Args:
        entries: stores from :func:`scan_stores`.
        transform: applied to each ``(T, T, 3)`` uint8 tile (e.g.
            :class:`~wsi_ssl.ssl.transforms.HistoDINOTransform`); None returns the tile as a
            uint8 tensor for :class:`~wsi_ssl.ssl.batch_augment.BatchDINOAugment`.

    ``keep``: per store, the tile numbers to use (:func:`~wsi_ssl.ssl.selection.select_tiles`;
    None: all). ``stain``: a :class:`~wsi_ssl.stain.StainNormalizer` applied to every tile
    before the transform (None: tiles as stored).
    Items are indexed by an int or by ``(index, seed)`` as yielded by
    :class:`StepBatchSampler`: the seed then seeds ``random``, numpy and torch for the
    transform (their previous states are restored afterwards).
    """

    def __init__(
        self,
        entries: Sequence[SlideEntry],
        transform: Callable | None = None,
        keep: Sequence[np.ndarray] | None = None,
        stain: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.entries = list(entries)
        self.stain = stain
        self.transform = transform
        self.keep = None if keep is None else [np.asarray(k, np.int64) for k in keep]
        sizes = (
            [e.n_tiles for e in self.entries] if self.keep is None else [len(k) for k in self.keep]
        )
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._pid: int | None = None
        self._readers: dict[int, TileReader] = {}

    @property
    def slide_sizes(self) -> list[int]:
        return np.diff(self.offsets).astype(int).tolist()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(slide number, tile number)`` of a dataset index."""
        if not 0 <= index < len(self):
            raise IndexError(f"tile index {index} out of range [0, {len(self)})")
        slide = bisect.bisect_right(self.offsets, index) - 1
        tile = index - int(self.offsets[slide])
        return slide, tile if self.keep is None else int(self.keep[slide][tile])

    def _tiles(self, slide: int) -> TileReader:
        if self._pid != os.getpid():  # a fresh process (DataLoader worker): own handles
            self._pid = os.getpid()
            self._readers = {}
        if slide not in self._readers:
            e = self.entries[slide]
            self._readers[slide] = TileReader(open_store(e.root).slide(e.slide_id).tiles)
        return self._readers[slide]

    def read_tile(self, index: int) -> np.ndarray:
        """The uint8 ``(T, T, 3)`` tile at a dataset index."""
        slide, tile = self.locate(int(index))
        try:
            return self._tiles(slide)[tile]
        except WsiSslError:
            raise
        except Exception as err:
            raise TileReadError(
                self.entries[slide].path, tile, tile + 1, f"{type(err).__name__}: {err}"
            ) from err

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        index, seed = item if isinstance(item, tuple) else (item, None)
        tile = self.read_tile(index)
        if self.stain is not None:  # (3, T, T) uint8 in, uint8 out
            tile = self.stain(torch.from_numpy(tile).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        if self.transform is None:
            return torch.from_numpy(tile)
        if seed is None:
            return self.transform(tile)
        with seeded(seed):
            return self.transform(tile)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pid"] = None
        state["_readers"] = {}
        return state


class seeded:
    """Seed ``random``, numpy and torch for a block, then restore their states."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.saved[0])
        np.random.set_state(self.saved[1])
        torch.set_rng_state(self.saved[2])
