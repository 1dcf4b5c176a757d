"""The state ``wsi-ssl serve`` shares between requests: the index, the stores, the pictures.

* Every index under the archive root can be searched (``index=`` name; default: the one
  given); each is reopened when ``wsi-ssl index --add`` / ``--remove`` or a rebuild writes a
  new generation, and a picture is embedded by the encoder of the generation searched.
* Slides may carry a label (``slide_labels``); searches can be limited to slides of given
  labels, and every answer carries the slide-level ranking of the same FAISS neighbours.
* A slide's store is revalidated on every use (one ``stat`` of its ``zarr.json``): a store
  re-tiled or set back to "writing" is reopened (or refused, :class:`StoreIncompleteError`),
  and every cached picture is keyed by that stamp, so nothing stale is served. A hit on a slide
  re-tiled after indexing keeps the indexed tiles' boxes and carries a ``note`` (its tile
  numbers no longer name the store's tiles, so its picture outlines none).
* FAISS queries run one at a time, each bounded (``MAX_QUERY_TILES``); pictures are drawn by a
  separate bounded pool (:class:`RenderPool`) so picture load cannot hold up a search.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from wsi_ssl.errors import (
    ConfigError,
    EmbeddingsNotFoundError,
    RegionOutsideSlideError,
    StoreNotFoundError,
    TilingMismatchError,
    WsiSslError,
)
from wsi_ssl.search.queries import centres_in
from wsi_ssl.serve.answers import answer, index_query
from wsi_ssl.serve.pyramid import Pyramid, TileCache, open_slide_file
from wsi_ssl.serve.refusals import StoreGoneError, check_on_slide

if TYPE_CHECKING:
    from wsi_ssl.encoders import Encoder
    from wsi_ssl.search.index import SearchIndex
    from wsi_ssl.search.results import Query
    from wsi_ssl.storage import SlideStore

__all__ = ["BusyError", "RenderPool", "SlideService"]

log = logging.getLogger(__name__)
MAX_K = 100
SLIDE_RANKING = 10
"""Slides listed in each answer's slide-level ranking."""
MAX_QUERY_TILES = 400
"""A region query over more stored tiles than this is refused (it would hold the index)."""
IMAGE_PIXELS = 4096 * 4096
"""Largest uploaded query picture, in pixels (checked from its header before decoding)."""
RENDER_NICENESS = 10
T = TypeVar("T")
Stamp = tuple[int, int]
Mode = Literal["regions", "tiles", "slides"]


class BusyError(Exception):
    """The picture queue is full: the client should retry later (503)."""


def _lower_priority() -> None:
    """Run this (render) thread at a lower CPU priority than searches, where the OS allows."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), RENDER_NICENESS)


class RenderPool:
    """``workers`` threads drawing pictures; at most ``queue`` requests waiting, beyond: busy."""

    def __init__(self, workers: int, queue: int) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="wsi-ssl-render", initializer=_lower_priority
        )
        self._limit = workers + queue
        self._pending = 0
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self._pending >= self._limit:
                raise BusyError
            self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            with self._lock:
                self._pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _manifest_stamp(index: SearchIndex) -> Stamp:
    """Inode and mtime of ``index``'s manifest: each generation writes a new file in its place."""
    from wsi_ssl.storage.index_files import MANIFEST

    return _stamp(index.files.path.parent / MANIFEST)


def _stamp(path: Path) -> Stamp:
    try:
        st = path.stat()
    except OSError:
        return (0, 0)
    return st.st_ino, st.st_mtime_ns


class SlideService:
    """The indexes, the archive's stores and their pictures, shared by all requests.

    Args:
        index: the default index (others under its root are opened by name on demand).
        cache_bytes: bound of the picture cache.
        slide_labels: slide id -> label, for the label filter (slides without one: "").
    """

    def __init__(
        self,
        index: SearchIndex,
        *,
        cache_bytes: int = 128 << 20,
        slide_labels: Mapping[str, str] | None = None,
    ) -> None:
        from wsi_ssl.storage import open_store

        self.default = index.name
        self._indexes: dict[str, tuple[Stamp, SearchIndex]] = {
            index.name: (_manifest_stamp(index), index)
        }
        self.archive = open_store(index.root)
        self.search_lock = threading.Lock()
        self._stores: dict[str, tuple[Stamp, SlideStore, Pyramid | None]] = {}
        self._stores_lock = threading.Lock()
        self.cache = TileCache(cache_bytes)
        self.slide_labels = dict(slide_labels or {})
        self._encoders: dict[str, Encoder] = {}  # by encoder id
        self._encoders_lock = threading.Lock()
        self._grids: dict[tuple[str, Stamp], str] = {}

    @property
    def index(self) -> SearchIndex:
        """The default index (see :meth:`index_for`)."""
        return self.index_for(None)

    def index_names(self) -> list[str]:
        from wsi_ssl.storage.index_files import list_indexes

        return list_indexes(self.archive.root)

    def index_for(self, name: str | None) -> SearchIndex:
        """Index ``name`` (default: the default one), reopened once a new generation is
        written (the open one kept if that fails)."""
        from wsi_ssl.errors import IndexNotFoundError
        from wsi_ssl.search.index import SearchIndex
        from wsi_ssl.storage.index_files import INDEX_DIR

        name = name or self.default
        entry = self._indexes.get(name)
        if entry is None:
            names = self.index_names()
            if name not in names:
                raise IndexNotFoundError(Path(INDEX_DIR) / name, names)
            with self.search_lock:
                if name not in self._indexes:
                    index = SearchIndex.open(self.archive.root, name)
                    self._indexes[name] = (_manifest_stamp(index), index)
            entry = self._indexes[name]
        stamp, index = entry
        if _manifest_stamp(index) != stamp:
            with self.search_lock:
                stamp, index = self._indexes[name]
                new = _manifest_stamp(index)
                if new != stamp:
                    try:  # tried once per generation, whatever the outcome
                        index = SearchIndex.open(index.root, index.name)
                    except WsiSslError as err:
                        log.warning(
                            "keeping index %s open: the new generation fails: %s", name, err
                        )
                    self._indexes[name] = (new, index)
        return self._indexes[name][1]

    # -- stores ----------------------------------------------------------------------------
    def _entry(self, slide: str, index: str | None) -> tuple[Stamp, SlideStore, Pyramid | None]:
        entry = self.index_for(index).resolve_slide(slide)
        return self._entry_of(entry["slide_id"], entry["name"])

    def _entry_of(self, slide_id: str, name: str = "") -> tuple[Stamp, SlideStore, Pyramid | None]:
        path = self.archive.store_path(slide_id)
        stamp = _stamp(path / "zarr.json")
        with self._stores_lock:
            entry = self._stores.get(slide_id)
            if entry is None or entry[0] != stamp:
                try:  # refuses an incomplete one
                    entry = (stamp, self.archive.slide(slide_id), None)
                except StoreNotFoundError as err:  # moved or deleted since indexing
                    raise StoreGoneError(name or slide_id, path) from err
                self._stores[slide_id] = entry
            return entry

    def store(self, slide: str, index: str | None = None) -> SlideStore:
        """The complete store of ``slide`` (id, unique id prefix or file name) of index
        ``index`` (default: the default one)."""
        return self._entry(slide, index)[1]

    def retiled(self, index: SearchIndex, slide_id: str) -> str | None:
        """Why ``slide_id``'s store no longer holds the tiles ``index`` has vectors of
        (:func:`~wsi_ssl.search.retiled.retiled_reason`), its coords digest cached per store."""
        from wsi_ssl.search.retiled import retiled_reason

        entry = index.resolve_slide(slide_id)
        return retiled_reason(entry, functools.partial(self._coords_digest, entry.slide_id))

    def _coords_digest(self, slide_id: str) -> str:
        from wsi_ssl.storage.embeddings import coords_sha256

        stamp, store, _ = self._entry_of(slide_id)  # by id: a hit of another index too
        with self._stores_lock:
            digest = self._grids.get((slide_id, stamp))
        if digest is None:
            digest = coords_sha256(np.asarray(store.coords))
            with self._stores_lock:
                self._grids[(slide_id, stamp)] = digest
        return digest

    def pyramid(self, slide: str, index: str | None = None) -> Pyramid:
        """The pictures of ``slide`` (of index ``index``), with its slide file when that
        opens and matches."""
        stamp, store, pyramid = self._entry(slide, index)
        if pyramid is None or pyramid.file_replaced():  # a changed file is looked at anew
            pyramid = Pyramid(store, *open_slide_file(store))  # the old one's reader: to GC
            with self._stores_lock:
                if self._stores.get(store.slide_id, (None,))[0] == stamp:
                    self._stores[store.slide_id] = (stamp, store, pyramid)
        return pyramid

    def picture(
        self, slide: str, key: tuple[Any, ...], draw: Callable[[], bytes], index: str | None = None
    ) -> bytes:
        """The cached picture ``key`` of ``slide``'s current store (``slide`` of index
        ``index``), drawn on a miss."""
        stamp, store, _ = self._entry(slide, index)
        full = (store.slide_id, stamp, *key)
        data = self.cache.get(full)
        if data is None:
            data = draw()
            self.cache.put(full, data)
        return data

    # -- listing ---------------------------------------------------------------------------
    def slides(self, index: str | None = None) -> list[dict[str, Any]]:
        """The slides of index ``index``, by file name (as a person looks for them)."""
        listed = [
            {
                "slide_id": s["slide_id"],
                "name": s["name"],
                "n_tiles": int(s["n_tiles"]),
                "label": self.slide_labels.get(s["slide_id"], ""),
            }
            for s in self.index_for(index).slides
        ]
        return sorted(listed, key=lambda s: (s["name"].lower(), s["slide_id"]))

    def slide(self, slide: str, index: str | None = None) -> dict[str, Any]:
        """``slide`` of index ``index``: its size, thumbnail size and DZI address (naming
        ``index`` when given, so its pictures come from the same index)."""
        pyramid = self.pyramid(slide, index)
        store = pyramid.store
        h, w = store.thumbnail.shape[:2]
        entry = self.index_for(index).resolve_slide(store.slide_id)
        source = "slide" if pyramid.file is not None else "tiles"
        version = hashlib.sha1(repr(self._entry_of(store.slide_id)[0]).encode()).hexdigest()[:10]
        return {
            "slide_id": store.slide_id,
            "name": entry["name"],
            "n_tiles": int(entry["n_tiles"]),
            "dimensions": [int(v) for v in store.source["dimensions"]],
            "mpp": float(store.source["mpp"]),
            "tile_size_level0": float(store.tiling["tile_size_level0"]),
            "thumbnail_size": [int(w), int(h)],
            "source": source,
            "dzi": f"/api/slides/{store.slide_id}/dzi/{version}/{source}.dzi{index_query(index or '', '?')}",
            "label": self.slide_labels.get(store.slide_id, ""),
        }

    def describe(self, index: str | None = None) -> dict[str, Any]:
        """Index ``index``'s summary, the archive's indexes and the slide labels."""
        info = self.index_for(index).describe()
        info.pop("path", None)  # no filesystem paths in any answer
        info["indexes"] = [self._summary(name) for name in self.index_names()]
        info["labels"] = sorted({v for v in self.slide_labels.values() if v})
        return info

    def _summary(self, name: str) -> dict[str, Any]:
        try:
            index = self.index_for(name)
        except WsiSslError as err:  # a damaged index is listed, not served
            return {"name": name, "error": type(err).__name__}
        return {
            "name": name,
            "kind": index.kind,
            "encoder_id": index.encoder_id,
            "n_vectors": index.n_vectors,
        }

    # -- searching -------------------------------------------------------------------------
    def region_query(
        self, slide: str, box: tuple[int, int, int, int], index: str | None = None
    ) -> Query:
        """The region query of ``box``, refused when over ``MAX_QUERY_TILES`` tiles have
        their centre in it (the tiles the query takes)."""
        store = self.store(slide, index)
        size, dimensions = float(store.tiling["tile_size_level0"]), store.source["dimensions"]
        n = len(centres_in(store.coords, size, dimensions, box))
        if n > MAX_QUERY_TILES:
            raise ConfigError(
                f"box holds {n} tiles; a query takes at most {MAX_QUERY_TILES}: draw a smaller box"
            )
        return self.index_for(index).query_region(store.slide_id, box)

    def excluded(self, index: SearchIndex, labels: Sequence[str]) -> list[int]:
        """Slide numbers of ``index`` whose label is not among ``labels`` (none: no filter)."""
        if not labels:
            return []
        wanted = set(labels)
        active = [e for e in index.entries if e.active]
        out = [e.number for e in active if self.slide_labels.get(e.slide_id, "") not in wanted]
        if len(out) == len(active):
            raise ConfigError(
                f"no slide of index {index.name} has label {', '.join(sorted(wanted))}; "
                f"labels: {', '.join(sorted(set(self.slide_labels.values()))) or 'none'}"
            )
        return out

    def search(
        self,
        slide: str,
        box: tuple[int, int, int, int],
        *,
        k: int,
        mode: Mode,
        exclude_self: bool,
        index: str | None = None,
        labels: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Search like ``wsi-ssl search``: a tile query at the box centre (else the tile in the
        box centred nearest it) for ``tiles``, else a region query over the box; only slides
        labelled one of ``labels`` when given."""
        if not 1 <= k <= MAX_K:
            raise ConfigError(f"k must be in 1..{MAX_K}, got {k}")
        x, y, w, h = box
        searched = self.index_for(index)
        entry = searched.resolve_slide(slide)
        slide = entry["slide_id"]  # indexed: their pictures show
        if w <= 0 or h <= 0:  # whatever the mode, as a region query refuses it
            raise RegionOutsideSlideError(
                f"{entry['name']}: box {x},{y},{w},{h} has no area; width and height must be > 0"
            )
        store = self.store(slide, searched.name)  # gone, being re-tiled: said first
        check_on_slide(entry["name"], box, store.source["dimensions"])
        try:
            if mode == "tiles":
                query = searched.query_tile(slide, (x + w // 2, y + h // 2), box)
            else:
                query = self.region_query(slide, box, searched.name)
        except (TilingMismatchError, EmbeddingsNotFoundError) as err:
            retiled = self._retiled_since(searched, slide)
            if retiled is None:
                raise
            raise retiled from err
        return self.run(searched, query, k=k, mode=mode, exclude_self=exclude_self, labels=labels)

    def _retiled_since(self, index: SearchIndex, slide_id: str) -> WsiSslError | None:
        """The error saying that ``slide_id`` was re-tiled since ``index`` was built (its store
        holds other tiles than those indexed), or None when it was not (or the index cannot
        tell)."""
        from wsi_ssl.search.retiled import ADVICE

        entry = index.resolve_slide(slide_id)
        if entry.coords_sha256 in (None, self._coords_digest(slide_id)):
            return None
        return TilingMismatchError(
            f"{entry.name} was re-tiled after indexing (index {index.name} holds its old "
            f"tiles); {ADVICE}"
        )

    def search_image(
        self,
        data: bytes,
        *,
        k: int,
        mode: Mode,
        index: str | None = None,
        image_mpp: float | None = None,
        labels: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Search with an uploaded picture (PNG, JPEG or TIFF bytes): decoded with the checks
        of :func:`wsi_ssl.search.image.load_image` (at most ``IMAGE_PIXELS``), rescaled from
        ``image_mpp`` (default: the index's), cut into tiles and embedded with the index's
        encoder (:meth:`encoder_of`)."""
        import tempfile

        searched = self.index_for(index)
        encoder = self.encoder_of(searched)
        with tempfile.TemporaryDirectory(prefix="wsi-ssl-upload-") as tmp:
            path = Path(tmp) / "upload"
            path.write_bytes(data)
            with self._encoders_lock:  # one embedding at a time: bounded memory
                query = searched.query_image(
                    path, image_mpp=image_mpp, encoder=encoder, max_pixels=IMAGE_PIXELS
                )
        return self.run(searched, query, k=k, mode=mode, labels=labels)

    def encoder_of(self, index: SearchIndex) -> Encoder:
        """The encoder of ``index``'s current generation, created once per encoder id: an
        index rebuilt under its name with another encoder gets the new one; encoders that no
        open index uses any more are let go."""
        with self._encoders_lock:
            encoder = self._encoders.get(index.encoder_id)
            if encoder is None:
                from wsi_ssl.search.encoder import index_encoder

                encoder = index_encoder(index.encoder_id, index.record.get("encoder", {}))
                used = {i.encoder_id for _, i in tuple(self._indexes.values())}
                self._encoders = {e: enc for e, enc in self._encoders.items() if e in used}
                self._encoders[index.encoder_id] = encoder
            return encoder

    def run(
        self,
        index: SearchIndex,
        query: Query,
        *,
        k: int,
        mode: Mode,
        exclude_self: bool = False,
        labels: Sequence[str] = (),
    ) -> dict[str, Any]:
        """``query`` searched in ``index`` (as ``SearchIndex.search`` does, with the label
        filter), answered with the slide-level ranking of the same neighbours."""
        from wsi_ssl.search.ranking import rank
        from wsi_ssl.search.results import SearchResult
        from wsi_ssl.search.searching import DEFAULT_HITS_PER_TILE

        exclude = self.excluded(index, labels)
        if exclude_self and query.slide_number is not None:
            exclude.append(int(query.slide_number))
        per_tile = k if mode == "tiles" else max(DEFAULT_HITS_PER_TILE, k)
        started = time.perf_counter()
        with self.search_lock:
            sims, ids = index.neighbours(query, mode, per_tile, exclude)
            hits = rank(query, mode, sims, ids, index.entries, index.coords, k)
            slides = rank(query, "slides", sims, ids, index.entries, index.coords, SLIDE_RANKING)
        info = {
            "name": index.name,
            "kind": index.kind,
            "encoder_id": index.encoder_id,
            "n_vectors": index.n_vectors,
            "promised_recall": index.promised_recall,
        }
        seconds = time.perf_counter() - started
        result = SearchResult(query, mode, k, exclude_self, info, hits, per_tile, seconds)
        retiled = {sid: self.retiled(index, sid) for sid in {h.slide_id for h in hits}}
        out = answer(result, {sid for sid, why in retiled.items() if why}, index.name)
        out["labels"] = list(labels)
        out["slides"] = [
            {
                "rank": s.rank,
                "slide_id": s.slide_id,
                "name": s.name,
                "score": round(float(s.score), 5),
                "n_hits": int(getattr(s, "n_hits", 0)),
                "label": self.slide_labels.get(s.slide_id, ""),
            }
            for s in slides
        ]
        for hit in out["hits"]:
            hit["label"] = self.slide_labels.get(hit["slide_id"], "")
            if retiled[hit["slide_id"]]:
                hit["note"] = retiled[hit["slide_id"]]
            if mode == "regions":  # the matched tiles' boxes (as indexed), for the small viewer
                entry = index.resolve_slide(hit["slide_id"])
                side = round(float(entry.tile_size_level0))
                rows = entry.offset + np.asarray(hit["tiles"], dtype=np.int64)
                hit["tile_boxes"] = [[int(x), int(y), side, side] for x, y in index.coords[rows]]
        return out
