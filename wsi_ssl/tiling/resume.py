"""What a re-run of a tiling job finds in a slide's existing store, and what it keeps.

A complete store made from the same file with the same settings is kept: the job skips the
slide (ROI classes named in another order, or twice, are the same settings). When only QC
thresholds differ it is kept too, and the new thresholds are written into its metadata in one
atomic rewrite: QC flags tiles and never drops them, so the tiles and their scores stand, and
every consumer (``embed --skip-flagged-tiles``, pretraining, MIL, the viewer) reads the
thresholds from the store. Anything else (the file's content, another setting, another
scale of the slide, an unfinished or damaged store, one ``wsi-ssl check --repair`` marked
for re-tiling) redoes the slide, and the reason is said. The slide's scale is another when
its mpp table row states another than the store's, when the store's came from a row the
table no longer has, or when the store's was an override and another override is given.
A slide found at a new path (the file was moved) has that path recorded in its store, where
the viewer reads it; another file (or the folder) of a DICOM series whose recorded file is
still there is the same slide where it was, not moved.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import StoreIncompleteError, WsiSslError
from wsi_ssl.slide import series_files
from wsi_ssl.storage import Archive, SlideStore
from wsi_ssl.storage.slide_store import rewrite_attrs
from wsi_ssl.storage.tile_reader import TileReader
from wsi_ssl.tiling.source import SlideSource

__all__ = [
    "QC_THRESHOLDS",
    "ExistingStore",
    "existing_store",
    "kept_series_file",
    "kept_store_tiles",
    "record_slide",
    "update_qc_thresholds",
    "update_source_path",
]

QC_THRESHOLDS = ("qc_min_focus", "qc_max_pen", "qc_min_tissue", "qc_max_dark")
"""The ``TilingConfig`` fields that only flag tiles (changed in place, never a re-tile)."""
ROI_CLASSES = ("roi_include", "roi_exclude")
"""The ``TilingConfig`` fields naming classes; their order and repeats do not matter."""


@dataclass(frozen=True)
class ExistingStore:
    """A slide's store as a tiling job finds it.

    Attributes:
        n_tiles: its tile count when it is complete and current (once ``qc_thresholds`` are
            written), else None.
        redo_because: why it must be tiled again; None when it is current or there is none.
        qc_thresholds: the QC thresholds to write into it, ``{field: new value}``.
        qc_changes: those changes as ``"field old -> new"``.
        mpp_source: where its scale came from (``source.mpp_source``), when it is current.
    """

    n_tiles: int | None = None
    redo_because: str | None = None
    qc_thresholds: dict[str, Any] = field(default_factory=dict)
    qc_changes: list[str] = field(default_factory=list)
    mpp_source: str | None = None


def existing_store(
    archive: Archive,
    slide_id: str,
    fingerprint: str,
    config: TilingConfig,
    mpp: float | None = None,
) -> ExistingStore:
    """What the store of ``slide_id`` holds against this file (``fingerprint``) and config;
    ``mpp``: the slide's scale as its mpp table row states it (None: no row)."""
    key = config.output_key()
    if key.get("roi_sha256") is not None:  # the annotations' content decides, not their path
        key.pop("roi")
    path = archive.store_path(slide_id)
    if not (path / "zarr.json").is_file():
        return ExistingStore()
    try:
        store = SlideStore.open(path)
        if store.source.get("fingerprint") != fingerprint:
            return ExistingStore(redo_because="the file's content changed")
        tiling = store.tiling
        changed = {k: v for k, v in key.items() if not _same(k, tiling.get(k), v)}
        if not key.get("qc") and not tiling.get("qc"):  # thresholds of no QC change nothing
            changed = {k: v for k, v in changed.items() if k not in QC_THRESHOLDS}
        described = [f"{k} {tiling.get(k)!r} -> {v!r}" for k, v in changed.items()]
        scale = _scale_change(store.source, config.mpp_override, mpp)
        if scale or (changed and not (set(changed) <= set(QC_THRESHOLDS) and tiling.get("qc"))):
            why = [*described, *([scale] if scale else [])]
            return ExistingStore(redo_because=f"settings changed: {', '.join(why)}")
        if TileReader(store.tiles).missing_shards():  # damaged since: redo it
            return ExistingStore(redo_because="tile shards missing")
        entry = archive.catalog.get(slide_id)  # "failed" beside a complete store: check's mark
        if entry is not None and entry.status == "failed":
            return ExistingStore(redo_because=f"marked for re-tiling: {entry.error}")
        return ExistingStore(
            store.n_tiles, None, changed, described, store.source.get("mpp_source")
        )
    except StoreIncompleteError:
        return ExistingStore(redo_because="the store was not finished (a stopped job's)")
    except (WsiSslError, OSError, KeyError, ValueError):  # damaged metadata: redo it
        return ExistingStore(redo_because="the store is damaged")


def _scale_change(
    source: Mapping[str, Any], override: float | None, stated: float | None
) -> str | None:
    """How the slide's scale this run (its mpp table row's, ``stated``; else the file's own,
    or ``override`` where the file records none) differs from the one its store ``source``
    records; None when it does not, or cannot tell (no row, no override: the file's own
    scale, unchanged with its content)."""
    recorded, how = source.get("mpp"), source.get("mpp_source")
    was = f"slide mpp {recorded} ({how})"
    if stated is not None:
        return None if recorded == stated else f"{was} -> {stated:g} (the mpp table)"
    if how == "table":  # the row is gone: the file's own scale now
        return f"{was} -> the file's own (no row in the mpp table now)"
    if how == "override" and override is not None and recorded != override:
        return f"{was} -> {override:g} (override)"
    return None


def _same(name: str, stored: Any, wanted: Any) -> bool:
    """Whether a store's setting is the one wanted; the ROI's classes as sets (their order
    and repeats make the same region)."""
    if name in ROI_CLASSES and isinstance(stored, list):
        return set(stored) == set(wanted)
    return bool(stored == wanted)


def update_qc_thresholds(store_path: Path, thresholds: dict[str, Any]) -> None:
    """Record new QC ``thresholds`` in the tiling settings of the store at ``store_path``
    (under the slide's lock)."""
    tiling = SlideStore.open(store_path).tiling
    rewrite_attrs(store_path, {"tiling": {**tiling, **thresholds}})


def update_source_path(store_path: Path, path: Path) -> str | None:
    """Record ``path`` as the file of the store at ``store_path`` (the slide moved there;
    under the slide's lock); the path it replaced, or None when it was already this one."""
    source = SlideStore.open(store_path).source
    old, new = str(source.get("path")), str(path.resolve())
    if old == new and source.get("name") == path.name:
        return None
    rewrite_attrs(store_path, {"source": {**source, "path": new, "name": path.name}})
    if old == new:  # another name for the same file (a link): named so, not moved
        return None
    return old


def kept_series_file(store_path: Path, path: Path) -> tuple[str, str] | None:
    """The (path, name) the store at ``store_path`` records when ``path`` is another file, or
    the folder, of that DICOM series and the recorded file is still there (the slide was not
    moved: its store keeps naming its file); None otherwise."""
    if not (path.is_dir() or path.suffix.lower() == ".dcm"):
        return None
    source = SlideStore.open(store_path).source
    recorded = Path(str(source.get("path")))
    if not recorded.exists() or recorded.resolve() == path.resolve():
        return None
    if recorded.is_dir():
        same = path.resolve().parent == recorded.resolve()
    else:
        same = recorded.resolve() in {f.resolve() for f in series_files(path)}
    return (str(recorded), str(source.get("name") or recorded.name)) if same else None


def record_slide(
    archive: Archive,
    source: SlideSource,
    config: TilingConfig,
    status: str,
    n_tiles: int | None = None,
    where: tuple[str, str] | None = None,
    found: ExistingStore | None = None,
    error: str | None = None,
) -> None:
    """The slide's catalog row in this scale's archive; ``where``: the (path, name) to record,
    else the source's; ``found``: the store found current (its scale's source, the file
    not opened)."""
    path, name = where or (str(source.path.resolve()), source.path.name)
    how = getattr(source, "mpp_source", None) or (found.mpp_source if found else None)
    archive.catalog.upsert(
        slide_id=source.slide_id,
        path=Path(path),
        name=name,
        fingerprint=source.fingerprint,
        status=status,
        n_tiles=n_tiles,
        error=error,
        tiling={
            **config.to_dict(),
            **config.output_key(),  # limits too: check's fix repeats them
            "mpp_table": how == "table",  # the scale its mpp table row states over the file's
        },
    )


def kept_store_tiles(root: Path, slide_id: str | None) -> int | None:
    """The tiles of the complete store of ``slide_id`` in ``root`` (a re-tile that fails
    leaves one in place: the earlier one, or the new one when only its catalog row failed),
    or None when there is none."""
    if slide_id is None:
        return None
    try:
        store = SlideStore.open(Archive(root).store_path(slide_id))
        return len(store.coords) if store.status == "complete" else None
    except (WsiSslError, OSError):
        return None
