"""Whether a slide's store or embeddings are between the two renames of a swap.

A re-tile puts the old store aside (``<id>.zarr.old``) and its new one in place
(``<id>.zarr.new`` renamed); a re-embed sets the old vectors aside (``.replaced-<eid>``) and
renames the new ones (``.writing-<eid>``) in. Between the renames, or after a job killed there
(``wsi-ssl check --repair`` finishes or undoes the swap), the slide has no complete store or no
complete embeddings although nothing was removed: a reader must not take them as gone.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from wsi_ssl.storage.embeddings import (
    EMBEDDINGS_GROUP,
    PARTIAL_PREFIX,
    REPLACED_PREFIX,
    complete_embedding_attrs,
)
from wsi_ssl.storage.slide_store import aside_path, is_complete_store, staging_path

__all__ = ["mid_swap", "mid_swap_note", "split_mid_swap"]


def mid_swap(root: str | Path, slide_id: str, encoder_id: str) -> bool:
    """Whether slide ``slide_id`` of archive ``root``, or its embeddings ``encoder_id``, are
    between the renames of a swap (see the module docstring): the old store set aside or the
    new one complete beside it; the old vectors set aside or the new ones complete beside them.
    A re-embed still writing (no vectors set aside) is not: the slide has none to keep."""
    store = Path(root) / "slides" / f"{slide_id}.zarr"
    if not store.exists():
        return aside_path(store).exists() or is_complete_store(staging_path(store))
    group = store / EMBEDDINGS_GROUP
    if (group / encoder_id).exists():
        return False
    written = complete_embedding_attrs(store, f"{PARTIAL_PREFIX}{encoder_id}")  # beside them
    return (group / f"{REPLACED_PREFIX}{encoder_id}").exists() or written is not None


def split_mid_swap(
    root: str | Path, encoder_id: str, slide_ids: list[str]
) -> tuple[list[str], list[str]]:
    """``slide_ids`` as (those not mid-swap, those mid-swap)."""
    held = [sid for sid in slide_ids if mid_swap(root, sid, encoder_id)]
    return [sid for sid in slide_ids if sid not in held], held


def mid_swap_note(names: Sequence[str], root: str | Path, *, kept: bool, then: str) -> str:
    """What an index build or update says of the slides mid-swap it ``kept`` as indexed (or
    left out), named in ``names``; ``then``: what brings them in once the swap has ended."""
    from wsi_ssl.listing import first_few

    return (
        f"{len(names)} slide(s) being re-tiled or re-embedded now, or left so by a killed job, "
        f"{'kept as indexed' if kept else 'left out'} ({first_few(names)}); when that job ends "
        f"(or after `wsi-ssl check {shlex.quote(str(root))} --repair`), {then}"
    )
