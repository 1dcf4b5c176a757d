"""The one resolver for slide names and the one for encoder ids, used by every command.

A slide may be named by its id, its file name, its file stem, its source path (from the
catalog) or a unique prefix of its id (at least 4 characters). A path names the slide tiled from
that file; one tiled from a file of its name elsewhere only when the path does not exist or that
file no longer does (slides moved, a labels file from another machine), never another file. An encoder by its full
``encoder_id`` or a unique prefix of one (e.g. the encoder name). Both raise the same typed
errors everywhere: :class:`~wsi_ssl.errors.UnknownSlideError` and
:class:`~wsi_ssl.errors.EmbeddingsNotFoundError` / :class:`~wsi_ssl.errors.ConfigError`.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable
from pathlib import Path

from wsi_ssl.errors import ConfigError, EmbeddingsNotFoundError, UnknownSlideError
from wsi_ssl.listing import first_few, one_or_many
from wsi_ssl.storage.archive import Archive, damaged_slide_id
from wsi_ssl.storage.embeddings import embedding_ids

__all__ = [
    "MIN_PREFIX",
    "archive_encoder_ids",
    "damaged_stores_advice",
    "resolve_encoder",
    "resolve_slide",
    "resolve_slides",
    "slide_matches",
    "slide_names",
]

MIN_PREFIX = 4


def slide_names(archive: Archive, slide_ids: Iterable[str] | None = None) -> dict[str, set[str]]:
    """Every string that names a slide (id, file name, stem, path, and the name it was tiled
    by, a link's, and its stem) -> the slide ids it names, for the complete stores (or
    ``slide_ids``)."""
    ids = archive.slide_ids if slide_ids is None else list(slide_ids)
    names: dict[str, set[str]] = {sid: {sid} for sid in ids}
    for sid, (path, name) in archive.source_files(ids).items():
        for key in (Path(path).name, Path(path).stem, path, name, Path(name).stem):
            names.setdefault(key, set()).add(sid)
    return names


def slide_matches(names: dict[str, set[str]], ids: list[str], wanted: str) -> set[str]:
    """The slide ids ``wanted`` names (none, one or several), given ``names =
    slide_names(archive, ids)``: for callers that report every bad name at once."""
    return _lookup(names, ids, wanted)


def _lookup(names: dict[str, set[str]], ids: list[str], wanted: str) -> set[str]:
    found = names.get(wanted) or set()
    if not found and _is_path(wanted):
        path = Path(wanted).expanduser()
        found = names.get(str(path.resolve())) or _same_name(names, path)
    elif not found:
        found = names.get(Path(wanted).name) or set()
    if not found and len(wanted) >= MIN_PREFIX:
        found = {sid for sid in ids if sid.startswith(wanted)}
    return found


def _is_path(wanted: str) -> bool:
    return "/" in wanted or (os.sep != "/" and os.sep in wanted)


def _same_name(names: dict[str, set[str]], path: Path) -> set[str]:
    """Slides tiled from a file of ``path``'s name elsewhere (moved since, or a labels file
    written on another machine), less those whose file is there and another than ``path``."""
    found = names.get(path.name) or set()
    if not path.exists():
        return found
    recorded = {k: v for k, v in names.items() if _is_path(k) and v & found}
    return {
        sid
        for sid in found
        if not any(sid in v and _another_file(Path(k), path) for k, v in recorded.items())
    }


def _another_file(recorded: Path, path: Path) -> bool:
    """Whether the file recorded for a slide is there and is not ``path`` (older catalogs
    kept a path as given: relative, or through a link, so the strings may differ)."""
    try:
        return not os.path.samefile(recorded, path)
    except OSError:  # the recorded file is gone (moved): it cannot be told apart
        return False


def resolve_slides(archive: Archive, wanted: str | Iterable[str]) -> list[str]:
    """Slide ids of the complete stores named by ``wanted`` (in order, without repeats; one
    name alone is a list of one).

    Raises:
        UnknownSlideError: a name matches no complete store, or several (the first such name).
        StoreCorruptError, SchemaMismatchError: a name matches no complete store but one
            damaged store (its error, which says how to redo it).
    """
    ids = archive.slide_ids
    names = slide_names(archive, ids)
    out: list[str] = []
    for name in one_or_many(wanted):
        found = _lookup(names, ids, name) or _swapping(archive, name) or _damaged(archive, name)
        if len(found) != 1:
            hint = "" if found else _known(names, ids)
            raise UnknownSlideError(name, f"archive {archive.root}", hint, matches=list(found))
        out.append(next(iter(found)))
    return list(dict.fromkeys(out))


def _swapping(archive: Archive, name: str) -> set[str]:
    """The slide ``name`` names among those whose store is not in place (a re-tile between
    its renames, a first tiling writing): its id when its store is back by now (the swap
    finished meanwhile), else the error opening it raises, which says which (mid-swap, or not
    tiled yet); none when it names none of them."""
    swapping = archive.swapping()
    found = _lookup(slide_names(archive, swapping), swapping, name) if swapping else set()
    if len(found) != 1:
        return set()
    from wsi_ssl.storage.slide_store import SlideStore

    SlideStore.open(archive.store_path(next(iter(found))))  # StoreNotFoundError
    return found


def _damaged(archive: Archive, name: str) -> set[str]:
    """Raise the error of the one damaged store ``name`` names (by id, id prefix or, from the
    catalog, file name; :attr:`Archive.damaged` of the latest scan), which says what to do,
    rather than calling it no such slide; none (an empty set) when it names none or several."""
    damaged = {damaged_slide_id(err): err for err in archive.damaged}
    found = _lookup(slide_names(archive, damaged), list(damaged), name) if damaged else set()
    if len(found) == 1:
        raise damaged[next(iter(found))]
    return set()


def _known(names: dict[str, set[str]], ids: list[str], shown: int = 5) -> str:
    """Some of the names that would work: file names where the catalog has them, else ids."""
    if not ids:
        return "the archive has no complete slide store; tile slides into it first"
    by_id = {sid: sid for sid in ids}
    for key, found in names.items():
        if len(found) == 1 and "." in key and "/" not in key:  # a file name, not a stem or path
            by_id[next(iter(found))] = key
    listed = first_few(sorted(by_id.values()), shown)
    return f"the archive's slides: {listed} (a slide id, file name or stem)"


def resolve_slide(archive: Archive, wanted: str) -> str:
    """The slide id of the one complete store named by ``wanted`` (see the module docstring)."""
    return resolve_slides(archive, [wanted])[0]


def archive_encoder_ids(archive: Archive, slide_ids: Iterable[str] | None = None) -> list[str]:
    """Encoder ids with complete embeddings in any of the (given) complete stores, sorted."""
    ids = archive.slide_ids if slide_ids is None else slide_ids
    return sorted({e for sid in ids for e in embedding_ids(archive.store_path(sid))})


def resolve_encoder(
    available: Iterable[str], wanted: str | None, where: str | Path, *, why: str = ""
) -> str:
    """The encoder id among ``available`` that ``wanted`` names (None: the only one); ``why``:
    what to do when none is there, where the caller knows better than "embed" (damaged stores).

    Raises:
        EmbeddingsNotFoundError: no id matches (the message lists those there).
        ConfigError: several match ``wanted``, or it is None and there are several.
    """
    ids = sorted(set(available))
    if wanted is None:
        if len(ids) == 1:
            return ids[0]
        if ids:
            raise ConfigError(
                f"{where}: embeddings of {len(ids)} encoders ({', '.join(ids)}); pass the "
                "encoder id (or a unique prefix of it) to choose one",
                parameters=("encoder",),
            )
        raise EmbeddingsNotFoundError(where, None, ids, why=why)
    if wanted in ids:
        return wanted
    matches = [i for i in ids if i.startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(
            f"{where}: {wanted!r} is the start of {len(matches)} encoder ids "
            f"({', '.join(matches)}); give more of the one you mean",
            parameters=("encoder",),
        )
    raise EmbeddingsNotFoundError(where, wanted, ids, why=why if not ids else "")


def damaged_stores_advice(root: str | Path, damaged: list[str]) -> str:
    """What to do when an archive's only slide stores are ``damaged`` (their paths), in place
    of "embed" (which cannot open them): the check that prints the tile command redoing each."""
    one = len(damaged) == 1
    some = "its one slide store is" if one else f"its {len(damaged)} slide stores are"
    return (
        f"{some} damaged ({first_few(damaged, 3)}); `wsi-ssl check {shlex.quote(str(root))}` "
        "prints the tile command that redoes " + ("it" if one else "each")
    )
