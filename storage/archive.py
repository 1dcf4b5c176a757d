"""An archive root: ``catalog.sqlite``, ``slides/<slide_id>.zarr`` and ``index/<name>/``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl.errors import (
    CatalogCorruptError,
    ConfigError,
    MultiScaleRootError,
    StoreCorruptError,
    StoreNotFoundError,
    UnknownSlideError,
    WsiSslError,
)
from wsi_ssl.storage.catalog import Catalog
from wsi_ssl.storage.fingerprint import SLIDE_ID
from wsi_ssl.storage.slide_store import (
    ASIDE_SUFFIX,
    STAGING_SUFFIX,
    STATUS_COMPLETE,
    SlideStore,
    staging_path,
)

SlideName = str | os.PathLike[str]
"""A slide as the archive's methods take it: its id, file name, stem or path."""

if TYPE_CHECKING:
    import dask.array as da
    import zarr

    from wsi_ssl.storage.embeddings import Embeddings


def open_slide_store(path: str | Path, *, require_complete: bool = True) -> SlideStore:
    """Open a slide store; damaged metadata is a :class:`StoreCorruptError` naming the path.

    Raises:
        StoreNotFoundError, StoreIncompleteError, SchemaMismatchError: as ``SlideStore.open``.
        StoreCorruptError: ``zarr.json`` (or a member's) is truncated or unreadable, or the
            store's folder is there without its ``zarr.json`` (lost: its data is still there).
    """
    if Path(path).is_dir() and not (Path(path) / "zarr.json").is_file():
        raise StoreCorruptError(path, "its zarr.json, the store's metadata, is missing")
    try:
        store = SlideStore.open(path, require_complete=require_complete)
        _ = store.status, store.source, store.tiling, store.n_tiles
    except WsiSslError:
        raise
    except Exception as err:  # JSONDecodeError, zarr's metadata errors, KeyError, OSError ...
        raise StoreCorruptError(path, f"{type(err).__name__}: {err}") from err
    return store


def damaged_slide_id(err: BaseException) -> str:
    """The slide id of a damaged store's error (its path's name without ``.zarr``)."""
    return Path(str(getattr(err, "path", "?"))).name.removesuffix(".zarr")


@dataclass
class StoreScan:
    """The slide stores under a root: complete ids, incomplete ids and damaged stores."""

    complete: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    damaged: list[WsiSslError] = field(default_factory=list)


class Archive:
    """Per-slide access to the tile stores under one root.

    Archive-wide listings skip a store whose metadata cannot be read and record its error in
    :attr:`damaged` (the latest scan), so one damaged store never stops the others.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.damaged: list[WsiSslError] = []
        """The errors of the stores the latest listing skipped (metadata unreadable)."""

    @property
    def slides_dir(self) -> Path:
        """``<root>/slides``, one ``<slide_id>.zarr`` store per slide."""
        return self.root / "slides"

    @property
    def catalog(self) -> Catalog:
        """The archive's slide table (``catalog.sqlite``: path, name, status, error, ...)."""
        return Catalog(self.root / "catalog.sqlite")

    def source_files(self, slide_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
        """Each slide's file path and its name as given (a link's name, not its target's):
        from the catalog, or, for slides it does not list (a lost or damaged catalog, a first
        tiling not yet in place), from the store's own metadata, or its new store's where it
        is not in place (stores that cannot be read are left out)."""
        wanted = set(slide_ids)
        try:
            entries = self.catalog.entries() if (self.root / "catalog.sqlite").is_file() else []
        except CatalogCorruptError:
            entries = []
        files = {e.slide_id: (e.path, e.name) for e in entries if e.slide_id in wanted}
        for sid in sorted(wanted - set(files)):
            path = self.store_path(sid)  # by id: no name to resolve (nor to recurse)
            with contextlib.suppress(WsiSslError):
                store = (
                    open_slide_store(path) if path.exists() else SlideStore.open(staging_path(path))
                )
                files[sid] = (str(store.source["path"]), store.source_name)
        return files

    def store_path(self, slide_id: str) -> Path:
        return self.slides_dir / f"{slide_id}.zarr"

    def scan(self) -> StoreScan:
        """Every store under ``slides/``, sorted; damaged ones (a folder without its
        ``zarr.json`` too) reported, not raised."""
        scan = StoreScan()
        for path in sorted(self._glob("*.zarr")):
            try:
                store = open_slide_store(path, require_complete=False)
            except StoreNotFoundError:
                continue
            except WsiSslError as err:  # damaged metadata, another schema
                scan.damaged.append(err)
                continue
            group = scan.complete if store.status == STATUS_COMPLETE else scan.incomplete
            group.append(store.slide_id)
        self.damaged = scan.damaged
        return scan

    def swapping(self) -> list[str]:
        """Ids of the stores not in place but written beside it (``<id>.zarr`` not there, its
        ``.old`` or ``.new`` is: a re-tile between its renames, a first tiling writing, or
        either killed), sorted; apart from :meth:`scan`, which every listing runs."""
        leftovers = [p for s in (ASIDE_SUFFIX, STAGING_SUFFIX) for p in self._glob(f"*.zarr{s}")]
        ids = {p.name.split(".zarr", 1)[0] for p in leftovers}
        return sorted(sid for sid in ids if not self.store_path(sid).exists())

    def _glob(self, pattern: str) -> list[Path]:
        return list(self.slides_dir.glob(pattern)) if self.slides_dir.is_dir() else []

    @property
    def slide_ids(self) -> list[str]:
        """Ids of the complete slide stores, sorted (damaged ones go to :attr:`damaged`)."""
        return self.scan().complete

    def slide(self, slide: SlideName) -> SlideStore:
        """The complete store of ``slide`` (its id, or its file name, stem, path or a unique
        id prefix); a clear error when missing, incomplete or damaged.

        Raises:
            StoreNotFoundError: no store of that slide id.
            UnknownSlideError: a name that names no complete store, or several.
        """
        return open_slide_store(self.store_path(self.slide_id_of(slide)))

    def slide_id_of(self, slide: SlideName) -> str:
        """The slide id ``slide`` names: itself when it has a store, else what
        :func:`~wsi_ssl.storage.resolve.resolve_slide` finds (a file stem of 16 hex digits
        too); an id of no store stays itself.

        Raises:
            ConfigError: ``slide`` is neither a string nor a path.
        """
        if not isinstance(slide, str | os.PathLike):
            raise ConfigError(
                f"a slide is named by its id, file name, stem or path (str or Path), not "
                f"{type(slide).__name__} {slide!r}",
                parameters=("slide",),
            )
        slide = os.fspath(slide)
        if self.store_path(slide).is_dir():
            return slide
        from wsi_ssl.storage.resolve import resolve_slide

        try:
            return resolve_slide(self, slide)
        except UnknownSlideError:
            if SLIDE_ID.fullmatch(slide):  # an id without a store: StoreNotFoundError follows
                return slide
            raise

    def tiles(self, slide: SlideName) -> zarr.Array[Any]:
        """A slide's tiles, uint8 (N, T, T, 3) RGB, as a Zarr array (read rows: ``[i:j]``);
        row i is the tile at ``coords(slide)[i]``."""
        return self.slide(slide).tiles

    def tiles_dask(self, slide: SlideName) -> da.Array:
        """:meth:`tiles` as a dask array, one chunk per stored shard."""
        return self.slide(slide).tiles_dask()

    def coords(self, slide: SlideName) -> np.ndarray:
        """int64 (N, 2): level-0 x, y of each tile's top-left corner on the slide; a tile
        spans ``tiling["tile_size_level0"]`` level-0 pixels (fractional when resampled)."""
        return self.slide(slide).coords

    def thumbnail(self, slide: SlideName) -> np.ndarray:
        """uint8 (h, w, 3) picture of the whole slide at ``tiling["thumbnail_mpp"]`` µm/px."""
        return self.slide(slide).thumbnail

    def tissue_mask(self, slide: SlideName) -> np.ndarray:
        """bool (h, w): the tissue detected on :meth:`thumbnail`, pixel for pixel."""
        return self.slide(slide).tissue_mask

    def embedding_ids(self, slide: SlideName) -> list[str]:
        """The encoder ids with complete embeddings of ``slide`` (an id or a name)."""
        from wsi_ssl.storage.embeddings import embedding_ids

        return embedding_ids(self.slide(slide))

    def embeddings(
        self, slide: str, encoder_id: str | None = None, *, lazy: bool = False
    ) -> Embeddings:
        """A slide's vectors (numpy, or dask if ``lazy``) with their coords and provenance.

        ``slide``: an id or a name; ``encoder_id`` may be a unique prefix; None takes the
        slide's only encoder.
        """
        from wsi_ssl.storage.embeddings import read_embeddings, resolve_encoder_id

        store = self.slide(slide)
        return read_embeddings(store, resolve_encoder_id(store, encoder_id), lazy=lazy)

    def plot_tiles(self, slide: SlideName, out: str | Path | None = None) -> Path:
        """Thumbnail with kept tiles drawn, saved as PNG (default ``<root>/plots/<id>_tiles.png``)."""
        from wsi_ssl.storage.plots import plot_tiles

        store = self.slide(slide)
        out = self.root / "plots" / f"{store.slide_id}_tiles.png" if out is None else Path(out)
        return plot_tiles(store, out)


def is_archive_root(path: Path) -> bool:
    """Whether ``path`` holds an archive (a catalog or slide stores, complete or not)."""
    return (path / "catalog.sqlite").is_file() or (path / "slides").is_dir()


def multi_scale_roots(path: Path) -> list[Path]:
    """The archive roots a multi-scale ``wsi-ssl tile --mpp 0.5,1.0`` wrote under ``path``
    (``mpp-*``), none where ``path`` is an archive root itself."""
    if is_archive_root(path):
        return []
    return sorted(p for p in path.glob("mpp-*") if is_archive_root(p))


def open_store(root: str | Path) -> Archive:
    """Open an archive root written by ``wsi-ssl tile``.

    Raises:
        MultiScaleRootError: ``root`` holds one archive root per scale (name one of them).
        StoreNotFoundError: ``root`` is no archive root.
    """
    root = Path(root)
    if not is_archive_root(root):
        scales = multi_scale_roots(root)
        if scales:
            raise MultiScaleRootError(root, scales)
        if root.is_file():
            raise StoreNotFoundError(root, "archive root (a file, not the folder tile --out wrote)")
        if root.is_dir():
            raise StoreNotFoundError(root, "archive root (the folder holds no catalog or slides)")
        raise StoreNotFoundError(root, "archive root")
    return Archive(root)
