"""The web application of ``wsi-ssl serve``: a JSON API over one search index and the page.

Routes (all read-only):

* ``GET /``: the page (``static/index.html``).
* ``GET /api/index``: the index summary (:meth:`SearchIndex.describe`).
* ``GET /api/slides``: the indexed slides; ``GET /api/slides/{slide}``: one slide's size,
  mpp and thumbnail size (``slide`` = id, unique id prefix or file name).
* ``GET /api/slides/{slide}/thumbnail.png``: the stored thumbnail.
* ``GET /api/slides/{slide}/region.png?box=X,Y,W,H[&outline=ROWS][&px=N]``: a level-0 region
  drawn from the stored tiles, the listed tile rows outlined.
* ``POST /api/search``: ``{slide, box: [x, y, w, h], k, mode, exclude_self}`` → the
  :meth:`SearchResult.to_dict` answer, each hit with the URL of its picture.

A library error becomes ``{"error": message, "type": name}`` with status 404 (unknown slide),
400 (a request to fix: bad box, no tissue there) or 500 (a damaged index or store); the page
shows the message.
"""

from __future__ import annotations

import io
import logging
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from wsi_ssl.errors import (
    ConfigError,
    NoTilesInRegionError,
    RegionOutsideSlideError,
    UnknownSlideError,
    WsiSslError,
)

if TYPE_CHECKING:
    from wsi_ssl.search.index import SearchIndex
    from wsi_ssl.search.results import SearchResult
    from wsi_ssl.storage import SlideStore

__all__ = ["create_app"]

STATIC = Path(__file__).with_name("static")
USER_ERRORS = (ConfigError, RegionOutsideSlideError, NoTilesInRegionError)
"""Errors a request can fix (400); other library errors are the server's (500)."""
log = logging.getLogger(__name__)
MAX_K = 100
PANEL_PX = (32, 1024)


def _png(image: Any) -> bytes:
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _parse_box(text: str) -> tuple[int, int, int, int]:
    try:
        x, y, w, h = (round(float(v)) for v in text.split(","))
    except (ValueError, OverflowError):  # OverflowError: inf
        raise ConfigError(f"box must be X,Y,W,H in level-0 pixels, got {text[:80]!r}") from None
    if w <= 0 or h <= 0:
        raise ConfigError(f"box {text!r} has no area; width and height must be > 0")
    return x, y, w, h


def _parse_rows(text: str) -> set[int]:
    try:
        return {int(v) for v in text.split(",") if v}
    except ValueError:
        raise ConfigError(
            f"outline must be tile rows separated by commas, got {text[:80]!r}"
        ) from None


class SlideService:
    """The index, the archive's stores and the rendered pictures, shared by all requests.

    FAISS queries run one at a time (a lock; each takes milliseconds); stores are opened once
    and kept; thumbnails are encoded once; the index is reopened when `wsi-ssl index --add` or
    `--remove` writes a new generation, so the page needs no restart.
    """

    def __init__(self, index: SearchIndex) -> None:
        from wsi_ssl.storage import open_store

        self._index = index
        self._stamp = (0, 0)
        self._stamp = self._manifest_stamp()
        self.archive = open_store(index.root)
        self._search_lock = threading.Lock()
        self._stores: dict[str, SlideStore] = {}
        self._stores_lock = threading.Lock()
        self.thumbnail_png = lru_cache(maxsize=64)(self._thumbnail_png)

    def _manifest_stamp(self) -> tuple[int, int]:
        """Inode and mtime of the manifest: each generation writes a new file in its place."""
        from wsi_ssl.storage.index_files import MANIFEST

        try:
            st = (self._index.files.path.parent / MANIFEST).stat()
        except OSError:
            return self._stamp
        return st.st_ino, st.st_mtime_ns

    @property
    def index(self) -> SearchIndex:
        """The index, reopened once `wsi-ssl index --add` or `--remove` has written a new
        generation (if that generation cannot be opened, the open one stays)."""
        from wsi_ssl.search.index import SearchIndex

        if self._manifest_stamp() != self._stamp:
            with self._search_lock:
                stamp = self._manifest_stamp()
                if stamp != self._stamp:
                    self._stamp = stamp  # tried once per generation, whatever the outcome
                    try:
                        self._index = SearchIndex.open(self._index.root, self._index.name)
                    except WsiSslError as err:
                        log.warning("keeping the index open: the new generation fails: %s", err)
        return self._index

    def store(self, slide: str) -> SlideStore:
        """The store of indexed ``slide`` (id, unique id prefix or file name)."""
        slide_id = self.index.resolve_slide(slide)["slide_id"]
        with self._stores_lock:
            if slide_id not in self._stores:
                self._stores[slide_id] = self.archive.slide(slide_id)
            return self._stores[slide_id]

    def slides(self) -> list[dict[str, Any]]:
        return [
            {"slide_id": s["slide_id"], "name": s["name"], "n_tiles": int(s["n_tiles"])}
            for s in self.index.slides
        ]

    def slide(self, slide: str) -> dict[str, Any]:
        store = self.store(slide)
        h, w = store.thumbnail.shape[:2]
        entry = self.index.resolve_slide(store.slide_id)
        return {
            "slide_id": store.slide_id,
            "name": entry["name"],
            "n_tiles": int(entry["n_tiles"]),
            "dimensions": [int(v) for v in store.source["dimensions"]],
            "mpp": float(store.source["mpp"]),
            "tile_size_level0": float(store.tiling["tile_size_level0"]),
            "thumbnail_size": [int(w), int(h)],
        }

    def _thumbnail_png(self, slide_id: str) -> bytes:
        return _png(self.store(slide_id).thumbnail)

    def region_png(
        self, slide: str, box: tuple[int, int, int, int], outline: set[int], px: int
    ) -> bytes:
        from wsi_ssl.search.gallery import region_mosaic

        if not PANEL_PX[0] <= px <= PANEL_PX[1]:
            raise ConfigError(f"px must be in {PANEL_PX[0]}..{PANEL_PX[1]}, got {px}")
        image = region_mosaic(self.store(slide), box, panel_px=px, outline=outline or None)
        return _png(image)

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
        with self._search_lock:
            if mode == "tiles":
                query = index.query_tile(slide, (x + w // 2, y + h // 2))
            else:
                query = index.query_region(slide, box)
            result = index.search(query, k=k, mode=mode, exclude_self=exclude_self)
        return self._answer(result)

    def _answer(self, result: SearchResult) -> dict[str, Any]:
        out = result.to_dict()
        q = result.query
        rows = [] if q.tile_numbers is None else [int(r) for r in q.tile_numbers]
        out["query"]["tiles"] = rows
        out["query"]["image"] = _region_url(str(q.slide_id), q.box, rows)
        for hit, d in zip(result.hits, out["hits"], strict=True):
            if result.mode == "tiles":
                d["box"] = [hit.x - hit.size, hit.y - hit.size, 3 * hit.size, 3 * hit.size]
                d["image"] = _region_url(hit.slide_id, d["box"], [hit.tile])
            elif result.mode == "regions":
                d["image"] = _region_url(hit.slide_id, hit.box, hit.tiles)
            else:
                d["box"] = d.pop("best_box")
                d["image"] = (
                    _region_url(hit.slide_id, d["box"], [])
                    if d["box"] is not None
                    else f"/api/slides/{hit.slide_id}/thumbnail.png"
                )
        return out


def _region_url(slide_id: str, box: Any, rows: list[int]) -> str:
    url = f"/api/slides/{slide_id}/region.png?box={','.join(str(int(v)) for v in box)}"
    return url + (f"&outline={','.join(map(str, rows))}" if rows else "")


class SearchRequest(BaseModel):
    """The body of ``POST /api/search``."""

    slide: str
    box: tuple[int, int, int, int] = Field(description="level-0 x, y, width, height")
    k: int = Field(8, ge=1, le=MAX_K)
    mode: Literal["regions", "tiles", "slides"] = "regions"
    exclude_self: bool = False


def create_app(index: SearchIndex) -> FastAPI:
    """The FastAPI application serving ``index`` (see the module docstring for the routes)."""
    service = SlideService(index)
    app = FastAPI(title="wsi-ssl", description="Similar-region search over a slide archive.")

    @app.exception_handler(WsiSslError)
    async def library_error(request: Request, exc: WsiSslError) -> JSONResponse:
        if isinstance(exc, UnknownSlideError):
            status = 404
        elif isinstance(exc, USER_ERRORS):
            status = 400
        else:  # the archive or the index is damaged: the server's fault, not the request's
            status = 500
            log.error("%s: %s", type(exc).__name__, exc)
        return JSONResponse({"error": str(exc), "type": type(exc).__name__}, status_code=status)

    def png(data: bytes) -> Response:
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/index")
    def describe() -> dict[str, Any]:
        return service.index.describe()

    @app.get("/api/slides")
    def slides() -> list[dict[str, Any]]:
        return service.slides()

    @app.get("/api/slides/{slide}")
    def slide(slide: str) -> dict[str, Any]:
        return service.slide(slide)

    @app.get("/api/slides/{slide}/thumbnail.png")
    def thumbnail(slide: str) -> Response:
        return png(service.thumbnail_png(service.store(slide).slide_id))

    @app.get("/api/slides/{slide}/region.png")
    def region(slide: str, box: str, outline: str = "", px: int = 320) -> Response:
        return png(service.region_png(slide, _parse_box(box), _parse_rows(outline), px))

    @app.post("/api/search")
    def search(request: SearchRequest) -> dict[str, Any]:
        return service.search(
            request.slide,
            request.box,
            k=request.k,
            mode=request.mode,
            exclude_self=request.exclude_self,
        )

    return app
