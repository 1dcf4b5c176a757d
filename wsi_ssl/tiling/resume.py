"""What a re-run of a tiling job finds in a slide's existing store, and what it keeps.

A complete store made from the same file with the same settings is kept: the job skips the
slide (ROI classes named in another order, or twice, are the same settings). When only QC
thresholds differ it is kept too, and the new thresholds are written into its metadata in one
atomic rewrite: QC flags tiles and never drops them, so the tiles and their scores stand, and
every consumer (``embed --skip-flagged-tiles``, pretraining, MIL, the viewer) reads the
thresholds from the store. Anything else (the file's content, another setting, an
unfinished or damaged store, one ``wsi-ssl check --repair`` marked for re-tiling) redoes the
slide, and the reason is said. A slide found at a new
path (the file was moved) has that path recorded in its store, where the viewer reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import StoreIncompleteError, WsiSslError
from wsi_ssl.storage import Archive, SlideStore
from wsi_ssl.storage.slide_store import rewrite_attrs
from wsi_ssl.storage.tile_reader import TileReader

__all__ = [
    "QC_THRESHOLDS",
    "ExistingStore",
    "existing_store",
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
    """

    n_tiles: int | None = None
    redo_because: str | None = None
    qc_thresholds: dict[str, Any] = field(default_factory=dict)
    qc_changes: list[str] = field(default_factory=list)


def existing_store(
    archive: Archive, slide_id: str, fingerprint: str, config: TilingConfig
) -> ExistingStore:
    """What the store of ``slide_id`` holds against this file (``fingerprint``) and config."""
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
        if changed and not (set(changed) <= set(QC_THRESHOLDS) and tiling.get("qc")):
            return ExistingStore(redo_because=f"settings changed: {', '.join(described)}")
        if TileReader(store.tiles).missing_shards():  # damaged since: redo it
            return ExistingStore(redo_because="tile shards missing")
        entry = archive.catalog.get(slide_id)  # "failed" beside a complete store: check's mark
        if entry is not None and entry.status == "failed":
            return ExistingStore(redo_because=f"marked for re-tiling: {entry.error}")
        return ExistingStore(store.n_tiles, None, changed, described)
    except StoreIncompleteError:
        return ExistingStore(redo_because="the store was not finished (a stopped job's)")
    except (WsiSslError, OSError, KeyError, ValueError):  # damaged metadata: redo it
        return ExistingStore(redo_because="the store is damaged")


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
