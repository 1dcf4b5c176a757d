"""The slides an index build or update leaves out because they are mid-swap, named in a note.

A slide caught between the renames of a re-tile or a re-embed (:mod:`wsi_ssl.storage.swaps`)
has no complete store or no complete embeddings in place, though its vectors are on disk beside
them. ``SearchIndex.add`` keeps the vectors it indexed of such a slide; a build (or an update,
for a slide not indexed yet) cannot read them safely (the swap may yet be finished or undone),
so it leaves the slide out and says so: the note names it and what brings it in.
"""

from __future__ import annotations

import glob
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from wsi_ssl.listing import first_few
from wsi_ssl.search.archive import catalog_names
from wsi_ssl.storage.embeddings import (
    EMBEDDINGS_GROUP,
    PARTIAL_PREFIX,
    REPLACED_PREFIX,
    complete_embedding_attrs,
)
from wsi_ssl.storage.slide_store import aside_path, staging_path
from wsi_ssl.storage.swaps import mid_swap, mid_swap_note, split_mid_swap

if TYPE_CHECKING:
    from wsi_ssl.search.archive import Collected, SlideEntry
    from wsi_ssl.storage import Archive

__all__ = ["build_notes", "keep_mid_swap", "left_out_mid_swap"]


def _holds_vectors(store: Path, encoder_id: str) -> bool:
    """Whether a side of ``store``'s swap holds complete vectors by ``encoder_id``: in place,
    set aside or written beside, in the store or (not in place) its old or new one."""
    stores = (store,) if store.exists() else (aside_path(store), staging_path(store))
    names = (encoder_id, f"{REPLACED_PREFIX}{encoder_id}", f"{PARTIAL_PREFIX}{encoder_id}")
    return any(complete_embedding_attrs(s, n) is not None for s in stores for n in names)


def left_out_mid_swap(archive: Archive, encoder_id: str, known: Collection[str]) -> list[str]:
    """A note naming the slides mid-swap with vectors by ``encoder_id`` that are not among
    ``known`` (the slides indexed, or seen and handled otherwise), or no note when none is."""
    embeddings = f"*.zarr/{EMBEDDINGS_GROUP}"
    swapping = {
        p.parts[-3].removesuffix(".zarr")
        for prefix in (REPLACED_PREFIX, PARTIAL_PREFIX)
        for p in archive.slides_dir.glob(f"{embeddings}/{prefix}{glob.escape(encoder_id)}")
    }  # complete stores whose embeddings are swapping; then stores not in place
    candidates = sorted((swapping | set(archive.swapping())) - set(known))
    held = [
        sid
        for sid in candidates
        if mid_swap(archive.root, sid, encoder_id)
        and _holds_vectors(archive.store_path(sid), encoder_id)
    ]
    if not held:
        return []
    names = catalog_names(archive)
    return [
        f"{len(held)} slide(s) being re-tiled or re-embedded now, or left so by a killed job, "
        f"left out ({first_few(names.get(sid, (sid, ''))[0] or sid for sid in held)}); when "
        f"that job ends (or after `wsi-ssl check {archive.root} --repair`), `wsi-ssl index "
        f"{archive.root} --add` adds them"
    ]


def build_notes(
    archive: Archive, encoder_id: str, found: Collected, slides: Sequence[str] | None
) -> list[str]:
    """What an index build says of the slides it left out mid-swap (nothing when it was given
    its ``slides``: each of those is indexed or refused)."""
    if slides is not None:
        return []
    return left_out_mid_swap(archive, encoder_id, [e.slide_id for e in found.entries])


def keep_mid_swap(
    archive: Archive,
    encoder_id: str,
    gone: list[str],
    indexed: Mapping[str, SlideEntry],
    known: Collection[str] | None,
    notes: list[str],
) -> list[str]:
    """For an index update: ``gone`` (indexed slides whose store or embeddings are not there)
    less those mid-swap, which the index keeps. Appends to ``notes`` a note naming those kept
    and one naming the slides mid-swap neither ``indexed`` nor ``known`` (the update's other
    slides; None: not looked for, the update was given its slides)."""
    gone, held = split_mid_swap(archive.root, encoder_id, gone)
    if held:
        notes.append(mid_swap_note([indexed[s].name for s in held], archive.root))
    if known is not None:
        notes += left_out_mid_swap(archive, encoder_id, {*indexed, *known})
    return gone
