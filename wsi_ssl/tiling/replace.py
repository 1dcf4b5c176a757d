"""Re-tiling a slide that already has a store: swap, don't delete; keep the embeddings if valid.

A new store is written beside the old one (``<id>.zarr.new``) and swapped in only when it is
complete (storage/slide_store.py: `swap_in`, `recover_swap`). Embeddings belong to tiles: when
the new tiles equal the old (same source file, coordinates, layout and shard bytes) they are
carried over to the new store; when they differ, they would be lost, which needs
``discard_embeddings=True``. Damage to the old store does not count against it (``wsi-ssl check``
asks for this re-tile): lost or altered shard files, coordinates and metadata are judged by what
was recorded when it was tiled (shard CRC32C, the contents' sha256, the embeddings' coordinate
hash, the tiling settings), since the same file, coordinates and settings make the same tiles. That is checked twice: before any tile is read, from the plan
(source fingerprint, tile settings, coordinates), and at the swap, from the tiles themselves.
All of it runs under the slide's exclusive lock, which embedding writers take shared: no
embedding job writes into a store while it is being replaced.
"""

from __future__ import annotations

import filecmp
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import EmbeddingsWouldBeDiscardedError
from wsi_ssl.storage.embeddings import complete_embedding_attrs, coords_sha256, embedding_ids
from wsi_ssl.storage.shards import SHARD_CHECKSUMS, shard_path
from wsi_ssl.storage.slide_store import (
    CONTENTS_SHA256,
    SlideStore,
    carry_embeddings,
    is_complete_store,
    recorded_attrs,
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


def _array(path: Path) -> zarr.Array[Any] | None:
    """The array at ``path``, or None where its metadata is gone or damaged."""
    try:
        return zarr.open_array(path, mode="r", zarr_format=3)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def same_coords(store_path: Path, coords: np.ndarray) -> bool:
    """Whether the store at ``store_path`` was tiled at ``coords``: by the coordinates' sha256
    recorded at its completion, else by its embeddings' (both outlive damage to its coords
    array), else by its coords array."""
    digest = coords_sha256(coords)  # equal to the contents digest of int64 coords
    recorded = (recorded_attrs(store_path).get(CONTENTS_SHA256) or {}).get("coords")
    if recorded is not None:
        return bool(recorded == digest)
    embedded = {
        (complete_embedding_attrs(store_path, e) or {}).get("coords_sha256")
        for e in embedding_ids(store_path)
    }
    if embedded:
        return digest in embedded
    old = _array(store_path / "coords")
    return old is not None and np.array_equal(old[...], coords)


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
    if not same_coords(previous.path, coords):
        try:
            before = str(previous.n_tiles)
        except (OSError, ValueError, KeyError):  # the tiles' metadata is damaged too
            before = "?"
        return f"other tile coordinates: {before} -> {len(coords)} tiles"
    return None


def same_tiles(old_path: Path, new: SlideStore) -> bool:
    """Whether the store at ``old_path`` holds the tiles ``new`` holds (same source file,
    coordinates, layout and codecs, shard bytes), judged as the module docstring says: a
    shard file ``old`` lost, or one whose bytes differ while the new shard's CRC32C is the one
    recorded when ``old`` was tiled, is the same; where the tiles array's metadata is gone,
    the recorded tiling settings decide."""
    attrs = recorded_attrs(old_path)
    fingerprint = (attrs.get("source") or {}).get("fingerprint")
    if fingerprint not in (None, new.source.get("fingerprint")):  # None: the id vouches
        return False
    if not same_coords(old_path, new.coords):
        return False
    old = _array(old_path / "tiles")
    if old is None:
        tiling = attrs.get("tiling") or {}
        return bool(tiling) and all(tiling.get(k) == new.tiling.get(k) for k in TILE_SETTINGS)
    if _layout(old) != _layout(new.tiles):
        return False
    old_dir, new_dir = old_path / "tiles", new.path / "tiles"
    names = sorted(  # the shard files; the metadata file was compared above, attributes aside
        str(p.relative_to(old_dir))
        for p in old_dir.rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    if not set(names) <= {str(p.relative_to(new_dir)) for p in new_dir.rglob("*") if p.is_file()}:
        return False
    _, mismatch, errors = filecmp.cmpfiles(old_dir, new_dir, names, shallow=False)
    if errors:
        return False
    checksums = old.attrs.get(SHARD_CHECKSUMS)
    recorded = [int(c) for c in checksums] if isinstance(checksums, list) else []
    remade = new.shard_checksums or []
    shard_of = {str(shard_path(old, i).relative_to(old_dir)): i for i in range(len(recorded))}
    for name in mismatch:  # the same iff the new bytes are those ``old`` recorded as tiled
        i = shard_of.get(name)
        if i is None or i >= len(remade) or remade[i] != recorded[i]:
            return False
    return True


def _layout(tiles: zarr.Array[Any]) -> dict[str, Any]:
    """The tiles array's metadata without its attributes (shard checksums and the like)."""
    return {k: v for k, v in tiles.metadata.to_dict().items() if k != "attributes"}


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

    Call holding the slide lock. The old store's embeddings (of a damaged store too) move
    over when the tiles are the same; otherwise they are dropped with the old store if
    ``discard_embeddings``.

    Raises:
        EmbeddingsWouldBeDiscardedError: the tiles differ, the old store has embeddings and
            ``discard_embeddings`` is False; nothing was changed.
    """
    new = SlideStore.open(staging, mode="r+", require_complete=False)
    ids = embedding_ids(store_path)
    result = Replacement()
    if ids:
        if same_tiles(store_path, new):
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
