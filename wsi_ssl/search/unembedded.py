"""The tiled slides an index build or update leaves out because they hold no complete
embeddings by its encoder (tiled since, their embeddings discarded by a re-tile, or left
unfinished by a killed job), named in a note with the command that embeds them and the one that
adds them; those an embedding job writes now are named apart, as being embedded.

Only attributes and locks are read (the stores' and their arrays'), no vectors. A slide another
note or list names is not named again: one indexed (an update removes those whose embeddings
are gone, and says so), taken out with ``SearchIndex.remove``, caught mid-swap
(:mod:`wsi_ssl.search.midswap`) or damaged (not among the complete stores). The embed command
repeats the flags the embeddings record; a weights file they record that is gone is said to be,
with a placeholder in its place. The notes of both kinds are made here: :func:`build_notes` and
:func:`update_notes`.
"""

from __future__ import annotations

import shlex
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_ssl.search import midswap
from wsi_ssl.search.archive import catalog_names
from wsi_ssl.storage.embeddings import complete_embedding_attrs
from wsi_ssl.storage.locks import embeddings_lock_path, is_locked
from wsi_ssl.storage.swaps import mid_swap

if TYPE_CHECKING:
    from wsi_ssl.search.archive import Collected
    from wsi_ssl.search.index import SearchIndex
    from wsi_ssl.storage import Archive

__all__ = ["being_embedded", "build_notes", "not_embedded", "unembedded_note", "update_notes"]


def not_embedded(archive: Archive, encoder_id: str, known: Collection[str]) -> list[str]:
    """Ids of the complete stores not among ``known`` with no complete embeddings by
    ``encoder_id`` (none, or an unfinished array) and not mid-swap (sorted)."""
    return [
        sid
        for sid in archive.slide_ids
        if sid not in known
        and complete_embedding_attrs(archive.store_path(sid), encoder_id) is None
        and not mid_swap(archive.root, sid, encoder_id)
    ]


def being_embedded(archive: Archive, encoder_id: str, slide_ids: Sequence[str]) -> list[str]:
    """Those of ``slide_ids`` whose embeddings ``encoder_id`` a job is writing now: it holds
    their lock, as ``wsi-ssl check`` tells (the slide's own lock, which any tiling run takes,
    is not asked: that is no embedding)."""
    return [
        sid for sid in slide_ids if is_locked(embeddings_lock_path(archive.root, sid, encoder_id))
    ]


def _embed_command(
    archive: Archive, encoder_id: str, indexed: Sequence[str], encoder: dict[str, Any]
) -> str:
    """``wsi-ssl embed ROOT --encoder ...``: the flags the first readable embeddings of an
    ``indexed`` slide record (encoder, dtype, stain normalisation), else those of ``encoder``;
    where the weights file (or pretrain checkpoint) they record is gone, FILE (CHECKPOINT) in
    its place and a word on it."""
    from wsi_ssl.storage.fix_commands import embedding_stain_flags, encoder_flags

    attrs: dict[str, Any] = {"encoder": encoder}
    for sid in indexed:
        recorded = complete_embedding_attrs(archive.store_path(sid), encoder_id)
        if recorded is not None and isinstance(recorded.get("encoder"), dict):
            attrs = recorded
            break
    used, gone = attrs.get("encoder") or {}, ""
    weights, source = used.get("weights_path"), used.get("source")
    if source in ("file", "wsi-ssl") and weights and not Path(weights).exists():
        stand_in, what = (
            ("FILE", "weights file") if source == "file" else ("CHECKPOINT", "checkpoint")
        )
        gone = f" ({stand_in}: the {what} they were embedded with; {weights}, where it was"
        gone += " recorded, is gone)"
        attrs = {**attrs, "encoder": {**used, "weights_path": stand_in}}
    flags = f"{encoder_flags(attrs, encoder_id)} {embedding_stain_flags(attrs)}".rstrip()
    return f"`wsi-ssl embed {shlex.quote(str(archive.root))} {flags}`{gone}"


def unembedded_note(
    archive: Archive,
    name: str,
    encoder_id: str,
    indexed: Sequence[str],
    known: Collection[str],
    encoder: dict[str, Any],
) -> list[str]:
    """The notes naming the slides :func:`not_embedded` finds (``indexed`` and ``known`` left
    alone): those :func:`being_embedded` with the command that adds them to index ``name``
    once their job ends, the others with the command that embeds them too; none when there
    are none."""
    from wsi_ssl.listing import first_few

    left = not_embedded(archive, encoder_id, {*indexed, *known})
    busy = being_embedded(archive, encoder_id, left)
    left = [sid for sid in left if sid not in busy]
    names = catalog_names(archive) if busy or left else {}
    shown = {sid: names.get(sid, (sid, ""))[0] or sid for sid in [*busy, *left]}
    add = f"`wsi-ssl index {shlex.quote(str(archive.root))} --name {name} --add` adds them"
    notes = []
    if busy:
        notes.append(
            f"{len(busy)} tiled slide(s) being embedded by {encoder_id} now, left out "
            f"({first_few(shown[s] for s in busy)}): when that job ends, {add}"
        )
    if left:
        notes.append(
            f"{len(left)} tiled slide(s) not embedded by {encoder_id}, left out "
            f"({first_few(shown[s] for s in left)}): "
            f"{_embed_command(archive, encoder_id, indexed, encoder)} embeds them, then {add}"
        )
    return notes


def build_notes(
    archive: Archive, name: str, encoder_id: str, found: Collected, slides: Sequence[str] | None
) -> list[str]:
    """What the build of index ``name`` says of the slides it left out: mid-swap, then not
    embedded (nothing when it was given its ``slides``: each of those is indexed or refused)."""
    notes = midswap.build_notes(archive, name, encoder_id, found, slides)
    if slides is None:
        indexed = [e.slide_id for e in found.entries]
        notes += unembedded_note(archive, name, encoder_id, indexed, (), found.encoder)
    return notes


def update_notes(
    archive: Archive, index: SearchIndex, gone: list[str], known: Collection[str] | None
) -> tuple[list[str], list[str]]:
    """For an update of ``index``: ``gone`` less the slides mid-swap it keeps, and the notes
    (:func:`~wsi_ssl.search.midswap.keep_mid_swap`'s, then the one naming the slides not
    embedded that are neither indexed nor ``known``; None: not looked for, the update was given
    its slides)."""
    gone, notes = midswap.keep_mid_swap(archive, index, gone, known)
    if known is not None:
        indexed = [s.slide_id for s in index.slides]
        encoder = index.record.get("encoder") or {}
        notes += unembedded_note(archive, index.name, index.encoder_id, indexed, known, encoder)
    return gone, notes
