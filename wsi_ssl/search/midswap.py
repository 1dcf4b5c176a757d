"""The slides an index build or update leaves out because they are mid-swap, named in a note.

A slide caught between the renames of a re-tile or a re-embed (:mod:`wsi_ssl.storage.swaps`)
has no complete store or no complete embeddings in place, though its vectors are on disk beside
them. ``SearchIndex.add`` keeps the vectors it indexed of such a slide; a build (or an update,
for a slide not indexed yet) cannot read them safely (the swap may yet be finished or undone),
so it leaves the slide out and says so: the note names it and what brings it in. A build that
finds no complete embeddings but such slides names them instead of sending the user to embed;
one whose only slide stores are damaged says so, and how to redo them.
"""

from __future__ import annotations

import glob
import shlex
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from wsi_ssl.errors import EmbeddingsNotFoundError, WsiSslError
from wsi_ssl.search.archive import catalog_names, resolve_encoder_id
from wsi_ssl.storage.embeddings import (
    EMBEDDINGS_GROUP,
    PARTIAL_PREFIX,
    REPLACED_PREFIX,
    complete_embedding_attrs,
    embedding_ids,
)
from wsi_ssl.storage.resolve import resolve_encoder
from wsi_ssl.storage.slide_store import aside_path, staging_path
from wsi_ssl.storage.swaps import mid_swap, mid_swap_note, split_mid_swap

if TYPE_CHECKING:
    from wsi_ssl.search.archive import Collected
    from wsi_ssl.search.index import SearchIndex
    from wsi_ssl.storage import Archive

__all__ = ["build_encoder_id", "build_notes", "keep_mid_swap", "left_out_mid_swap"]


def _add_command(archive: Archive, name: str) -> str:
    """The command that updates index ``name`` (named: with several indexes, a bare
    ``--add`` is refused)."""
    return f"`wsi-ssl index {shlex.quote(str(archive.root))} --name {name} --add`"


def _holds_vectors(store: Path, encoder_id: str) -> bool:
    """Whether a side of ``store``'s swap holds complete vectors by ``encoder_id``: in place,
    set aside or written beside, in the store or (not in place) its old or new one."""
    stores = (store,) if store.exists() else (aside_path(store), staging_path(store))
    names = (encoder_id, f"{REPLACED_PREFIX}{encoder_id}", f"{PARTIAL_PREFIX}{encoder_id}")
    return any(complete_embedding_attrs(s, n) is not None for s in stores for n in names)


def _swapping_encoder_ids(archive: Archive) -> set[str]:
    """Encoder ids of the vectors that swaps hold: set aside or written beside in a store in
    place, or complete in the old or new store of one not in place."""
    ids = {
        p.name.removeprefix(prefix)
        for prefix in (REPLACED_PREFIX, PARTIAL_PREFIX)
        for p in archive.slides_dir.glob(f"*.zarr/{EMBEDDINGS_GROUP}/{prefix}*")
    }
    for sid in archive.swapping():
        store = archive.store_path(sid)
        ids.update([*embedding_ids(aside_path(store)), *embedding_ids(staging_path(store))])
    return ids


def _held(archive: Archive, encoder_id: str, known: Collection[str]) -> list[str]:
    """The names of the slides mid-swap with vectors by ``encoder_id`` that are not among
    ``known`` (slide ids)."""
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
    names = catalog_names(archive) if held else {}
    return [names.get(sid, (sid, ""))[0] or sid for sid in held]


def _all_mid_swap(archive: Archive, wanted: str | None) -> tuple[str, list[str]]:
    """The encoder id ``wanted`` names among those of the vectors swaps hold, and the names of
    the slides mid-swap with its vectors ("" and none when it names none)."""
    try:
        encoder_id = resolve_encoder(_swapping_encoder_ids(archive), wanted, archive.root)
    except WsiSslError:
        return "", []
    return encoder_id, _held(archive, encoder_id, ())


def build_encoder_id(archive: Archive, wanted: str | None) -> str:
    """The encoder id an index build takes (:func:`~wsi_ssl.search.archive.resolve_encoder_id`).

    Raises:
        EmbeddingsNotFoundError: no complete embeddings by ``wanted``; when the slides with
            some are all mid-swap, the message names them and how the swap ends.
    """
    try:
        return resolve_encoder_id(archive, wanted)
    except EmbeddingsNotFoundError:
        encoder_id, held = _all_mid_swap(archive, wanted)
        if held:  # not the advice to embed again: that would redo work that is done
            note = mid_swap_note(held, archive.root, kept=False, then="build the index again")
            raise EmbeddingsNotFoundError(archive.root, encoder_id, [], why=note) from None
        raise


def left_out_mid_swap(
    archive: Archive, name: str, encoder_id: str, known: Collection[str]
) -> list[str]:
    """A note naming the slides mid-swap with vectors by ``encoder_id`` that are not among
    ``known`` (the slides indexed, or seen and handled otherwise), with the command that adds
    them to index ``name``, or no note when none is."""
    held = _held(archive, encoder_id, known)
    then = f"{_add_command(archive, name)} adds them"
    return [mid_swap_note(held, archive.root, kept=False, then=then)] if held else []


def build_notes(
    archive: Archive, name: str, encoder_id: str, found: Collected, slides: Sequence[str] | None
) -> list[str]:
    """What the build of index ``name`` says of the slides it left out mid-swap (nothing when
    it was given its ``slides``: each of those is indexed or refused)."""
    if slides is not None:
        return []
    return left_out_mid_swap(archive, name, encoder_id, [e.slide_id for e in found.entries])


def keep_mid_swap(
    archive: Archive, index: SearchIndex, gone: list[str], known: Collection[str] | None
) -> tuple[list[str], list[str]]:
    """For an update of ``index``: ``gone`` (its slides whose store or embeddings are not
    there) less those mid-swap, which it keeps; and the notes naming those kept and the slides
    mid-swap neither indexed nor ``known`` (the update's other slides; None: not looked for,
    the update was given its slides)."""
    gone, held = split_mid_swap(archive.root, index.encoder_id, gone)
    names = {s.slide_id: s.name for s in index.slides}
    notes = []
    if held:
        then = f"{_add_command(archive, index.name)} brings them up to date"
        notes.append(mid_swap_note([names[s] for s in held], archive.root, kept=True, then=then))
    if known is not None:
        notes += left_out_mid_swap(archive, index.name, index.encoder_id, {*names, *known})
    return gone, notes
