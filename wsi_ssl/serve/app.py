"""The web application of ``wsi-ssl serve``: the page, a JSON API over one search index, the
deep-zoom pictures and the label files, behind :class:`wsi_ssl.serve.security.Guard`.

Routes:

* ``GET /``: the page (``static/index.html``; its script, style and the OpenSeadragon viewer
  under ``/static/``).
* ``GET /api/index``: the index summary; ``GET /api/slides``: the indexed slides;
  ``GET /api/slides/{slide}``: one slide's size, mpp, thumbnail size and DZI address
  (``slide`` = id, unique id prefix or file name).
* pictures (:mod:`wsi_ssl.serve.pictures`): thumbnail, region and DZI tiles.
* ``POST /api/search``: ``{slide, box: [x, y, w, h], k, mode, exclude_self}`` → the
  :meth:`SearchResult.to_dict` answer, each hit with its box and the URL of its picture.
* labels (:mod:`wsi_ssl.serve.labels`): accept / reject hits, "more like these".

A library error becomes ``{"error": message, "type": name}`` with status 404 (unknown slide),
400 (a request to fix), 503 (a store being rewritten, or the picture queue full) or 500 (a
damaged index or store); messages carry no filesystem paths, and no answer repeats the body.
API docs are off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from wsi_ssl.errors import (
    ConfigError,
    NoTilesInRegionError,
    RegionOutsideSlideError,
    StoreIncompleteError,
    UnknownSlideError,
    WsiSslError,
)
from wsi_ssl.serve.labels import add_label_routes
from wsi_ssl.serve.pictures import add_picture_routes
from wsi_ssl.serve.security import LOOPBACK_HOSTS, Guard, GuardConfig, redact_paths
from wsi_ssl.serve.service import MAX_K, BusyError, RenderPool, SlideService

if TYPE_CHECKING:
    from wsi_ssl.search.index import SearchIndex

__all__ = ["create_app"]

STATIC = Path(__file__).with_name("static")
USER_ERRORS = (ConfigError, RegionOutsideSlideError, NoTilesInRegionError)
"""Errors a request can fix (400); other library errors are the server's (500)."""
log = logging.getLogger(__name__)


class SearchRequest(BaseModel):
    """The body of ``POST /api/search``."""

    slide: str = Field(max_length=200)
    box: tuple[int, int, int, int] = Field(description="level-0 x, y, width, height")
    k: int = Field(8, ge=1, le=MAX_K)
    mode: Literal["regions", "tiles", "slides"] = "regions"
    exclude_self: bool = False


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": redact_paths(message), "type": kind}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(WsiSslError)
    async def library_error(request: Request, exc: WsiSslError) -> JSONResponse:
        if isinstance(exc, UnknownSlideError):
            status = 404
        elif isinstance(exc, USER_ERRORS):
            status = 400
        elif isinstance(exc, StoreIncompleteError):
            status = 503  # being re-tiled: try again once it is complete
        else:  # the archive or the index is damaged: the server's fault, not the request's
            status = 500
            log.error("%s: %s", type(exc).__name__, exc)
        return _error(status, str(exc), type(exc).__name__)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """Which fields are wrong and why, never the values sent."""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return _error(422, problems[:500], "RequestValidationError")

    @app.exception_handler(BusyError)
    async def busy(request: Request, exc: BusyError) -> JSONResponse:
        response = _error(503, "too many pictures are being drawn; try again", "Busy")
        response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, "internal error; see the server's log", type(exc).__name__)


def create_app(
    index: SearchIndex,
    *,
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS,
    token: str | None = None,
    render_workers: int | None = None,
    render_queue: int = 64,
    cache_bytes: int = 128 << 20,
) -> Guard:
    """The ASGI application serving ``index`` (see the module docstring for the routes).

    Args:
        index: the search index to serve.
        allowed_hosts: ``Host`` names answered (loopback names by default; ``"*"`` for any).
        token: an access token every request must carry (None: none needed).
        render_workers: threads drawing pictures (default: half the CPUs, at least 1).
        render_queue: picture requests that may wait beyond those being drawn (then 503).
        cache_bytes: bound of the picture cache.
    """
    service = SlideService(index, cache_bytes=cache_bytes)
    workers = render_workers or max(1, (os.cpu_count() or 2) // 2)
    pool = RenderPool(workers, render_queue)
    app = FastAPI(title="wsi-ssl", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/index")
    def describe() -> dict[str, Any]:
        return service.describe()

    @app.get("/api/slides")
    def slides() -> list[dict[str, Any]]:
        return service.slides()

    @app.get("/api/slides/{slide}")
    def slide(slide: str) -> dict[str, Any]:
        return service.slide(slide)

    @app.post("/api/search")
    def search(request: SearchRequest) -> dict[str, Any]:
        return service.search(
            request.slide,
            request.box,
            k=request.k,
            mode=request.mode,
            exclude_self=request.exclude_self,
        )

    add_picture_routes(app, service, pool)
    add_label_routes(app, service, pool)
    return Guard(app, GuardConfig(allowed_hosts=allowed_hosts, token=token))
