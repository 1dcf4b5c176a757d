"""The state ``wsi-ssl serve`` shares between requests: the index, the stores, the pictures.

* The index is reopened when ``wsi-ssl index --add`` / ``--remove`` writes a new generation.
* A slide's store is revalidated on every use (one ``stat`` of its ``zarr.json``): a store
  re-tiled or set back to "writing" is reopened (or refused, :class:`StoreIncompleteError`),
  and every cached picture is keyed by that stamp, so nothing stale is served.
* FAISS queries run one at a time, each bounded (``MAX_QUERY_TILES``); pictures are drawn by a
  separate bounded pool (:class:`RenderPool`) so picture load cannot hold up a search.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from wsi_ssl.errors import ConfigError, WsiSslError
from wsi_ssl.serve.pyramid import Pyramid, TileCache, tiles_in

if TYPE_CHECKING:
    from wsi_ssl.search.index import SearchIndex
    from wsi_ssl.search.results import Query, SearchResult
    from wsi_ssl.storage import SlideStore

__all__ = ["BusyError", "RenderPool", "SlideService"]

log = logging.getLogger(__name__)
MAX_K = 100
MAX_QUERY_TILES = 400
"""A region query over more stored tiles than this is refused (it would hold the index)."""
RENDER_NICENESS = 10
T = TypeVar("T")
Stamp = tuple[int, int]


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


def _stamp(path: Path) -> Stamp:
    try:
        st = path.stat()
    except OSError:
        return (0, 0)
    return st.st_ino, st.st_mtime_ns


class SlideService:
    """The index, the archive's stores and their pictures, shared by all requests."""

    def __init__(self, index: SearchIndex, *, cache_bytes: int = 128 << 20) -> None:
        from wsi_ssl.storage import open_store

        self._index = index
        self._stamp: Stamp = (0, 0)
        self._stamp = self._manifest_stamp()
        self.archive = open_store(index.root)
        self.search_lock = threading.Lock()
        self._stores: dict[str, tuple[Stamp, SlideStore, Pyramid | None]] = {}
        self._stores_lock = threading.Lock()
        self.cache = TileCache(cache_bytes)

    def _manifest_stamp(self) -> Stamp:
        """Inode and mtime of the manifest: each generation writes a new file in its place."""
        from wsi_ssl.storage.index_files import MANIFEST

        stamp = _stamp(self._index.files.path.parent / MANIFEST)
        return stamp if stamp != (0, 0) else self._stamp

    @property
    def index(self) -> SearchIndex:
        """The index, reopened once a new generation is written (kept if that one fails)."""
        from wsi_ssl.search.index import SearchIndex

        if self._manifest_stamp() != self._stamp:
            with self.search_lock:
                stamp = self._manifest_stamp()
                if stamp != self._stamp:
                    self._stamp = stamp  # tried once per generation, whatever the outcome
                    try:
                        self._index = SearchIndex.open(self._index.root, self._index.name)
                    except WsiSslError as err:
                        log.warning("keeping the index open: the new generation fails: %s", err)
        return self._index

    # -- stores ----------------------------------------------------------------------------
    def _entry(self, slide: str) -> tuple[Stamp, SlideStore, Pyramid | None]:
        slide_id = self.index.resolve_slide(slide)["slide_id"]
        path = self.archive.store_path(slide_id)
        stamp = _stamp(path / "zarr.json")
        with self._stores_lock:
            entry = self._stores.get(slide_id)
            if entry is None or entry[0] != stamp:
                entry = (stamp, self.archive.slide(slide_id), None)  # refuses an incomplete one
                self._stores[slide_id] = entry
            return entry

    def store(self, slide: str) -> SlideStore:
        """The complete store of indexed ``slide`` (id, unique id prefix or file name)."""
        return self._entry(slide)[1]

    def stamp(self, slide: str) -> Stamp:
        return self._entry(slide)[0]

    def pyramid(self, slide: str) -> Pyramid:
        """The pictures of ``slide``, with its slide file when that opens and matches."""
        stamp, store, pyramid = self._entry(slide)
        if pyramid is None:
            pyramid = Pyramid(store, _open_reader(store))
            with self._stores_lock:
                if self._stores.get(store.slide_id, (None,))[0] == stamp:
                    self._stores[store.slide_id] = (stamp, store, pyramid)
        return pyramid

    def picture(self, slide: str, key: tuple[Any, ...], draw: Callable[[], bytes]) -> bytes:
        """The cached picture ``key`` of ``slide``'s current store, drawn on a miss."""
        stamp, store, _ = self._entry(slide)
        full = (store.slide_id, stamp, *key)
        data = self.cache.get(full)
        if data is None:
            data = draw()
            self.cache.put(full, data)
        return data

    # -- listing ---------------------------------------------------------------------------
    def slides(self) -> list[dict[str, Any]]:
        return [
            {"slide_id": s["slide_id"], "name": s["name"], "n_tiles": int(s["n_tiles"])}
            for s in self.index.slides
        ]

    def slide(self, slide: str) -> dict[str, Any]:
        pyramid = self.pyramid(slide)
        store = pyramid.store
        h, w = store.thumbnail.shape[:2]
        entry = self.index.resolve_slide(store.slide_id)
        source = "slide" if pyramid.file is not None else "tiles"
        version = hashlib.sha1(repr(self.stamp(store.slide_id)).encode()).hexdigest()[:10]
        return {
            "slide_id": store.slide_id,
            "name": entry["name"],
            "n_tiles": int(entry["n_tiles"]),
            "dimensions": [int(v) for v in store.source["dimensions"]],
            "mpp": float(store.source["mpp"]),
            "tile_size_level0": float(store.tiling["tile_size_level0"]),
            "thumbnail_size": [int(w), int(h)],
            "source": source,
            "dzi": f"/api/slides/{store.slide_id}/dzi/{version}/{source}.dzi",
        }

    def describe(self) -> dict[str, Any]:
        info = self.index.describe()
        info.pop("path", None)  # no filesystem paths in any answer
        return info

    # -- searching -------------------------------------------------------------------------
    def region_query(self, slide: str, box: tuple[int, int, int, int]) -> Query:
        """The region query of ``box``, refused when it covers over ``MAX_QUERY_TILES``."""
        store = self.store(slide)
        n = len(tiles_in(store, box))
        if n > MAX_QUERY_TILES:
            raise ConfigError(
                f"box covers {n} tiles; a query takes at most {MAX_QUERY_TILES}: draw a smaller box"
            )
        return self.index.query_region(store.slide_id, box)

    def search(
        self,
        slide: str,
        box: tuple[int, int, int, int],
        *,
        k: int,
        mode: Literal["regions", "tiles", "slides"],
        exclude_self: bool,
    ) -> dict[str, Any]:
        """Search like ``wsi-ssl search``: a tile query at the box centre for ``tiles``, else
        a region query over the box."""
        if not 1 <= k <= MAX_K:
            raise ConfigError(f"k must be in 1..{MAX_K}, got {k}")
        x, y, w, h = box
        index = self.index
        slide = index.resolve_slide(slide)["slide_id"]  # indexed slides only: their pictures show
        if mode == "tiles":
            query = index.query_tile(slide, (x + w // 2, y + h // 2))
        else:
            query = self.region_query(slide, box)
        with self.search_lock:
            result = index.search(query, k=k, mode=mode, exclude_self=exclude_self)
        return answer(result)

    def search_vectors(self, query: Query, k: int) -> SearchResult:
        with self.search_lock:
            return self.index.search(query, k=k, mode="tiles")


def _open_reader(store: SlideStore) -> Any:
    """The store's slide file through its reader, or None when it is gone or differs."""
    from wsi_ssl.slide import open_slide

    try:
        reader = open_slide(store.source["path"])
    except (WsiSslError, OSError) as err:
        log.info("slide %s: drawing from the stored tiles (%s)", store.slide_id, type(err).__name__)
        return None
    if list(reader.dimensions) != [int(v) for v in store.source["dimensions"]]:
        reader.close()
        return None
    return reader


def answer(result: SearchResult) -> dict[str, Any]:
    """``result`` as the page reads it: each hit with its box and the URL of its picture."""
    out = result.to_dict()
    q = result.query
    rows = [] if q.tile_numbers is None else [int(r) for r in q.tile_numbers]
    out["query"]["tiles"] = rows
    if q.slide_id is not None:
        out["query"]["image"] = region_url(str(q.slide_id), q.box, rows)
    for hit, d in zip(result.hits, out["hits"], strict=True):
        if result.mode == "tiles":
            d["tile_box"] = [hit.x, hit.y, hit.size, hit.size]
            d["box"] = [hit.x - hit.size, hit.y - hit.size, 3 * hit.size, 3 * hit.size]
            d["image"] = region_url(hit.slide_id, d["box"], [hit.tile])
        elif result.mode == "regions":
            d["image"] = region_url(hit.slide_id, hit.box, hit.tiles)
        else:
            d["box"] = d.pop("best_box")
            d["image"] = (
                region_url(hit.slide_id, d["box"], [])
                if d["box"] is not None
                else f"/api/slides/{hit.slide_id}/thumbnail.png"
            )
    return out


def region_url(slide_id: str, box: Any, rows: list[int]) -> str:
    url = f"/api/slides/{slide_id}/region.png?box={','.join(str(int(v)) for v in box)}"
    return url + (f"&outline={','.join(map(str, rows))}" if rows else "")
