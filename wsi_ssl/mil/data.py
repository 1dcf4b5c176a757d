"""Bags: one slide's tile embeddings, read lazily from ``<slide>.zarr/embeddings/<encoder_id>``.

A :class:`BagDataset` holds only references to slide stores; it reads one bag per item, checks
it once against the store (status, row count, coords hash, via
:func:`wsi_ssl.storage.embeddings.read_embeddings`), optionally keeps it in a bounded in-memory
cache, and during training subsamples large bags afresh every epoch. A bag holds only the tiles
with vectors (:meth:`~wsi_ssl.storage.embeddings.Embeddings.embedded_only`: not those an
embedding job with ``skip_flagged_tiles`` left out).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from wsi_ssl.errors import EmbeddingsCorruptError, EmptyBagError
from wsi_ssl.storage import SlideStore
from wsi_ssl.storage.embeddings import Embeddings, open_embeddings_array, read_embeddings

__all__ = ["BagCache", "BagDataset", "BagRef", "EpochOrder", "kept_rows", "read_bag"]


def kept_rows(store: SlideStore | str | Path) -> np.ndarray | None:
    """Row numbers of the tiles that pass the store's QC (None: every tile passes)."""
    from wsi_ssl.tiling.qc import kept_tiles

    if not isinstance(store, SlideStore):
        store = SlideStore.open(store)
    kept = kept_tiles(store)
    return None if kept.all() else np.flatnonzero(kept)


def read_bag(
    store: SlideStore | str | Path,
    encoder_id: str,
    *,
    name: str | None = None,
    skip_flagged: bool = False,
) -> Embeddings:
    """One slide's embeddings (features as stored, float16 or float32) and coords, of the
    tiles that hold vectors; with ``skip_flagged``, only those that pass QC
    (:func:`kept_rows`). ``tiles`` gives each row's tile number (None: row i is tile i).

    Raises:
        EmbeddingsNotFoundError, EmbeddingsIncompleteError, SchemaMismatchError: see
            :func:`~wsi_ssl.storage.embeddings.read_embeddings`.
        EmptyBagError: the slide has no tiles (or none that pass QC).
    """
    if not isinstance(store, SlideStore):
        store = SlideStore.open(store)
    emb = read_embeddings(store, encoder_id).embedded_only()
    rows = kept_rows(store) if skip_flagged else None
    if rows is not None:
        emb = emb.select(rows)
    if len(emb) == 0:
        raise EmptyBagError(name or str(store.path), encoder_id)
    return emb


@dataclass(frozen=True)
class BagRef:
    """Where a bag is and its class index."""

    slide_id: str
    store_path: Path
    y: int


class BagCache:
    """Bags kept as stored (float16) up to ``max_bytes``; once full, new bags are not kept."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._bags: dict[str, np.ndarray] = {}

    def get(self, key: str) -> np.ndarray | None:
        return self._bags.get(key)

    def put(self, key: str, bag: np.ndarray) -> None:
        if key not in self._bags and self.nbytes + bag.nbytes <= self.max_bytes:
            self._bags[key] = bag
            self.nbytes += bag.nbytes

    def __len__(self) -> int:
        return len(self._bags)


class BagDataset(torch.utils.data.Dataset):
    """Bags of ``encoder_id`` embeddings for a list of slides.

    Items are ``(features float32 (n, D), y, index)``. With ``max_tiles``, bags larger than that
    are subsampled without replacement, seeded by ``(seed, epoch, index)`` so runs repeat
    whatever the number of workers; call :meth:`set_epoch` each epoch.

    Args:
        refs: the slides.
        encoder_id: which embeddings.
        max_tiles: subsample larger bags to this many tiles (None: never).
        seed: subsampling seed.
        cache: a shared :class:`BagCache` (not used in worker processes).
        skip_flagged: only the tiles that pass the store's QC (:func:`kept_rows`).
    """

    def __init__(
        self,
        refs: Sequence[BagRef],
        encoder_id: str,
        *,
        max_tiles: int | None = None,
        seed: int = 0,
        cache: BagCache | None = None,
        skip_flagged: bool = False,
    ) -> None:
        self.refs = list(refs)
        self.skip_flagged = skip_flagged
        self._rows: dict[str, np.ndarray | None] = {}
        self.encoder_id = encoder_id
        self.max_tiles = max_tiles
        self.seed = seed
        self.epoch = 0
        self.cache = cache
        self._arrays: dict[str, zarr.Array] = {}

    def __getstate__(self) -> dict[str, Any]:  # worker processes: no handles, no cache
        state = dict(self.__dict__)
        state["_arrays"] = {}
        state["cache"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.refs)

    def raw(self, index: int) -> np.ndarray:
        """The whole bag as stored (checked against its store on first read)."""
        ref = self.refs[index]
        if self.cache is not None and (hit := self.cache.get(ref.slide_id)) is not None:
            return hit
        array = self._arrays.get(ref.slide_id)
        if array is None:
            emb = read_bag(ref.store_path, self.encoder_id, skip_flagged=self.skip_flagged)
            bag = np.asarray(emb.features)
            self._arrays[ref.slide_id] = open_embeddings_array(ref.store_path, self.encoder_id)
            self._rows[ref.slide_id] = emb.tiles
        else:
            rows = self._rows.get(ref.slide_id)
            try:
                bag = np.asarray(array[:] if rows is None else array.get_orthogonal_selection(rows))
            except RuntimeError as err:  # a chunk failing its checksum since the first read
                raise EmbeddingsCorruptError(ref.store_path, self.encoder_id, str(err)) from err
        if self.cache is not None:
            self.cache.put(ref.slide_id, bag)
        return bag

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        """Bag ``key``, or ``(index, epoch)`` (what :class:`EpochOrder` yields to workers)."""
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        bag = self.raw(index)
        if self.max_tiles is not None and len(bag) > self.max_tiles:
            rng = np.random.default_rng([self.seed, epoch, index])
            keep = np.sort(rng.choice(len(bag), self.max_tiles, replace=False))
            bag = bag[keep]
        return torch.from_numpy(bag.astype(np.float32)), self.refs[index].y, index


class EpochOrder(torch.utils.data.Sampler):
    """The order of one epoch as ``(index, epoch)`` keys, settable between epochs, so one
    DataLoader with persistent workers serves every epoch and subsampling stays per epoch."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []

    def set(self, order: Iterable[int], epoch: int) -> None:
        self.keys = [(int(i), epoch) for i in order]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)
