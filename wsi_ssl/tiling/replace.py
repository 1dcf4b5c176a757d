"""Re-tiling a slide that already has a store: swap, don't delete; keep the embeddings if valid.

A new store is written beside the old one (``<id>.zarr.new``) and swapped in only when it is
complete (storage/slide_store.py: `swap_in`, `recover_swap`). Embeddings belong to tiles: when
the new tiles equal the old (same source file, coordinates, layout and shard bytes) they are
carried over to the new store (shard files the old store lost do not count: a re-tile restores
them); when they differ, they would be lost, which needs
``discard_embeddings=True``. That is checked twice: before any tile is read, from the plan
(source fingerprint, tile settings, coordinates), and at the swap, from the tiles themselves.
All of it runs under the slide's exclusive lock, which embedding writers take shared: no
embedding job writes into a store while it is being replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import EmbeddingsWouldBeDiscardedError
from wsi_ssl.storage.embeddings import embedding_ids
from wsi_ssl.storage.slide_store import (
    SlideStore,
    carry_embeddings,
    is_complete_store,
    same_tiles,
    swap_in,
)

TILE_SETTINGS = ("mpp", "tile_size", "overlap", "codec", "jpeg_quality", "tiles_per_chunk")
"""Settings whose change changes the stored tile bytes (the tissue threshold changes only
which tiles are kept, which the coordinates show)."""


@dataclass(frozen=True)
class Replacement:
    """What a swap did with the old store's embeddings."""

    kept_embeddings: list[str] = field(default_factory=list)
    discarded_embeddings: list[str] = field(default_factory=list)


def previous_store(store_path: Path) -> SlideStore | None:
    """The complete store now at ``store_path``, or None."""
    return SlideStore.open(store_path) if is_complete_store(store_path) else None


def plan_difference(
    previous: SlideStore, fingerprint: str, config: TilingConfig, coords: np.ndarray
) -> str | None:
    """Why tiles planned with ``config`` at ``coords`` will differ from ``previous``'s, or None."""
    if previous.source.get("fingerprint") != fingerprint:
        return "the slide file changed"
    settings = config.output_key()
    for name in TILE_SETTINGS:
        if previous.tiling.get(name) != settings[name]:
            return f"{name} {previous.tiling.get(name)!r} -> {settings[name]!r}"
    old = previous.coords
    if not np.array_equal(old, coords):
        return f"other tile coordinates: {len(old)} -> {len(coords)} tiles"
    return None


def check_plan(
    previous: SlideStore | None,
    fingerprint: str,
    config: TilingConfig,
    coords: np.ndarray,
    discard_embeddings: bool,
) -> None:
    """Refuse, before any tile is read, a re-tile that would lose embeddings.

    Raises:
        EmbeddingsWouldBeDiscardedError: the plan changes the tiles of a store with
            embeddings and ``discard_embeddings`` is False (the message lists them).
    """
    if previous is None or discard_embeddings:
        return
    ids = embedding_ids(previous)
    reason = plan_difference(previous, fingerprint, config, coords) if ids else None
    if reason is not None:
        raise EmbeddingsWouldBeDiscardedError(previous.path, ids, reason)


def replace_store(store_path: Path, staging: Path, discard_embeddings: bool) -> Replacement:
    """Finish the store written at ``staging`` and swap it in at ``store_path``.

    Call holding the slide lock. The old store's embeddings move over when the tiles are the
    same; otherwise they are dropped with the old store if ``discard_embeddings``.

    Raises:
        EmbeddingsWouldBeDiscardedError: the tiles differ, the old store has embeddings and
            ``discard_embeddings`` is False; nothing was changed.
    """
    new = SlideStore.open(staging, mode="r+", require_complete=False)
    previous = previous_store(store_path)
    ids = embedding_ids(previous) if previous is not None else []
    result = Replacement()
    if previous is not None and ids:
        if same_tiles(previous, new):
            carry_embeddings(store_path, staging, ids)
            result = Replacement(kept_embeddings=ids)
        elif discard_embeddings:
            result = Replacement(discarded_embeddings=ids)
        else:
            raise EmbeddingsWouldBeDiscardedError(
                store_path, ids, "the new tiles differ from the stored ones"
            )
    new.mark_complete()
    swap_in(staging, store_path)
    return result
