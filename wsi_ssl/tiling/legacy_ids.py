"""DICOM slides tiled before a slide's fingerprint covered its whole series: found again.

A DICOM slide's fingerprint (`wsi_ssl.tiling.source.slide_fingerprint`) is its series'; before,
it was the fingerprint of the one ``.dcm`` file the job was given (the first of a folder's, as
`collect_slide_paths` still gives), so the same slide had another id. A re-run on such an
archive takes the store it finds under the old id, rather than writing a second store under
the new one: :func:`adopt_existing_store` points the slide's source at the old id and
fingerprint for that archive, and resume, re-tiles and embeddings go on under them.

Never a different slide: the old store is taken only when it records exactly the old
fingerprint of the file given now, a hash of that file's bytes, which hold its series' and its
own instance UIDs. What the old fingerprint never covered, the other instances of the series,
is not checked for such a store (``resume=False`` re-tiles it, under its old id).
"""

from __future__ import annotations

import weakref
from pathlib import Path

from wsi_ssl.slide import series_files
from wsi_ssl.storage import Archive, SlideStore, fingerprint_file, slide_id_from_fingerprint
from wsi_ssl.tiling.source import SlideSource

__all__ = ["adopt_existing_store", "legacy_fingerprint"]

_OWN: weakref.WeakKeyDictionary[SlideSource, tuple[str, str]] = weakref.WeakKeyDictionary()
"""Each source's own id and fingerprint, before any archive's old ones were adopted."""


def legacy_fingerprint(path: Path) -> str | None:
    """The fingerprint a DICOM slide at ``path`` had before it covered the series: its file's
    (a folder's first ``.dcm`` file's); None for a slide that is not DICOM."""
    if path.is_dir():
        files = series_files(path)
        return fingerprint_file(files[0]) if files else None
    return fingerprint_file(path) if path.suffix.lower() == ".dcm" else None


def adopt_existing_store(source: SlideSource, archive: Archive) -> str:
    """Give ``source`` the slide id (and fingerprint) its slide already has in ``archive``:
    its own, unless only a store (or catalog row) under its legacy fingerprint's id exists
    there. Returns the id; call before taking the slide's lock.
    """
    own_id, own = _OWN.setdefault(source, (source.slide_id, source.fingerprint))
    source.slide_id, source.fingerprint = own_id, own
    if _recorded_fingerprint(archive, own_id) is not None:
        return own_id
    legacy = legacy_fingerprint(source.path)
    if legacy is None or legacy == own:
        return own_id
    legacy_id = slide_id_from_fingerprint(legacy)
    if _recorded_fingerprint(archive, legacy_id) == legacy:
        source.slide_id, source.fingerprint = legacy_id, legacy
    return source.slide_id


def _recorded_fingerprint(archive: Archive, slide_id: str) -> str | None:
    """The fingerprint ``archive`` records for ``slide_id``: its store's (complete or not,
    or the one a killed swap left aside), else its catalog row's; None when it has neither."""
    store_path = archive.store_path(slide_id)
    for path in (store_path, *store_path.parent.glob(f"{store_path.name}.*")):
        try:
            return str(SlideStore.open(path, require_complete=False).source["fingerprint"])
        except Exception:  # missing, unreadable or foreign: not a record of this slide
            continue
    if not (archive.root / "catalog.sqlite").is_file():
        return None
    entry = archive.catalog.get(slide_id)
    return None if entry is None else entry.fingerprint
