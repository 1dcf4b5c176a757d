"""The web application of ``wsi-ssl serve``: the page, a JSON API over one search index, the
deep-zoom pictures and the label files, behind :class:`wsi_ssl.serve.security.Guard`.

Routes:

* ``GET /``: the page (``static/index.html``; its script, style and the OpenSeadragon viewer
  under ``/static/``).
* ``GET /api/index``: the index summary; ``GET /api/slides``: the indexed slides;
  ``GET /api/slides/{slide}``: one slide's size, mpp, thumbnail size and DZI address
  (``slide`` = id, unique id prefix or file name). Each takes ``?index=NAME`` (default: the
  index given), as do the pictures and layers: a slide is looked up in that index.
* pictures (:mod:`wsi_ssl.serve.pictures`): thumbnail, region and DZI tiles.
* ``POST /api/search``: ``{slide, box: [x, y, w, h], k, mode, exclude_self, index, labels}``
  → the :meth:`SearchResult.to_dict` answer, each hit with its box, label and the URL of its
  picture, and ``slides``: the slide-level ranking of the same neighbours. ``index`` names
  one of the archive's indexes (``/api/index`` lists them), ``labels`` keeps slides of those
  labels (``slide_labels``; ``/api/slides`` gives each slide's).
* ``POST /api/search/image?k=&mode=&index=&image_mpp=&labels=``: the same with a picture as
  the body (``image/png``, ``image/jpeg`` or ``image/tiff``, at most ``max_image_bytes``).
* layers (:mod:`wsi_ssl.serve.layers`): tile QC, annotations, MIL attention.
* labels (:mod:`wsi_ssl.serve.labels`, routes declared here): accept / reject hits, "more
  like these" and the concept map, each with the ``index`` the page's menu picked.

A library error becomes ``{"error": message, "type": name}`` with status 404 (unknown slide,
or one whose store was moved or deleted while the server runs), 422 (a new label starting like
a spreadsheet formula), 400 (a request to fix), 409 (a slide re-tiled since indexing: tiled
otherwise, or without the index's embeddings), 503 (a store being rewritten, the label files
held by another server past the wait, or the picture queue full) or 500 (a damaged index or
store); messages carry no filesystem paths, and no answer repeats the body. API docs are off.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi import Query as QueryParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from wsi_ssl.errors import (
    ConfigError,
    EmbeddingsNotFoundError,
    ImageQueryError,
    IndexNotFoundError,
    NoTilesInRegionError,
    RegionOutsideSlideError,
    SchemaMismatchError,
    StoreCorruptError,
    StoreIncompleteError,
    StoreLockedError,
    StoreNotFoundError,
    TilingMismatchError,
    UnknownSlideError,
    WsiSslError,
)
from wsi_ssl.search.queries import clip_box
from wsi_ssl.serve.labels import (
    SLIDE_LABELS,
    FormulaLabelError,
    Label,
    LabelBook,
    concept_map,
    more_like,
)
from wsi_ssl.serve.layers import MilPredictions, add_layer_routes
from wsi_ssl.serve.pictures import IndexName, add_picture_routes
from wsi_ssl.serve.security import (
    LOOPBACK_HOSTS,
    MAX_UPLOAD_BYTES,
    Guard,
    GuardConfig,
    redact_paths,
)
from wsi_ssl.serve.service import MAX_K, BusyError, RenderPool, SlideService

if TYPE_CHECKING:
    from wsi_ssl.search.index import SearchIndex

__all__ = ["create_app"]

STATIC = Path(__file__).with_name("static")
USER_ERRORS = (ConfigError, RegionOutsideSlideError, NoTilesInRegionError, ImageQueryError)
"""Errors a request can fix (400); other library errors are the server's (500)."""
log = logging.getLogger(__name__)
UPLOAD_PATH = "/api/search/image"


class SearchRequest(BaseModel):
    """The body of ``POST /api/search``."""

    slide: str = Field(max_length=200)
    box: tuple[int, int, int, int] = Field(description="level-0 x, y, width, height")
    k: int = Field(8, ge=1, le=MAX_K)
    mode: Literal["regions", "tiles", "slides"] = "regions"
    exclude_self: bool = False
    index: str | None = Field(None, max_length=200)
    labels: list[str] = Field(default_factory=list, max_length=100)


class LabelRequest(BaseModel):
    """The body of ``POST /api/labels``."""

    slide: str = Field(max_length=200)
    box: tuple[int, int, int, int]
    label: Label = Field("positive", max_length=1000)
    verdict: Literal["accept", "reject", "clear"] = "accept"
    index: str | None = Field(None, max_length=200)


class MoreRequest(BaseModel):
    """The body of ``POST /api/labels/more``."""

    label: Label = Field("positive", max_length=1000)
    k: int = Field(8, ge=1, le=MAX_K)
    index: str | None = Field(None, max_length=200)


def read_slide_labels(index: SearchIndex, path: str | Path) -> dict[str, str]:
    """Slide id -> label from a ``slide,label`` CSV (as for ``wsi-ssl mil``; one label is
    enough for a filter), its slides named by id, unique id prefix or file name and resolved
    against the whole archive (so every index the page offers, and slides added later, keep
    their labels). Rows naming no slide of the archive, or a name several slides have, are
    skipped with a warning (logged and printed to stderr) naming their lines."""
    from wsi_ssl.mil.labels import read_labels
    from wsi_ssl.storage import open_store
    from wsi_ssl.storage.resolve import resolve_slide

    archive = open_store(index.root)
    out, skipped = {}, []
    for row in read_labels(path, for_training=False).rows:
        try:
            out[resolve_slide(archive, row.slide)] = row.label
        except (UnknownSlideError, StoreCorruptError, SchemaMismatchError) as err:  # or damaged
            skipped.append(f"line {row.line}: {redact_paths(str(err))}")
    if skipped:
        warning = (
            f"slide labels {Path(path).name}: {len(skipped)} row(s) left out, name each slide "
            "by its id (or a unique file name) to keep them: " + "; ".join(skipped[:20])
        )
        log.warning("%s", warning)
        print(f"wsi-ssl: warning: {warning}", file=sys.stderr, flush=True)
    return out


def _add_label_routes(app: FastAPI, service: SlideService, pool: RenderPool) -> None:
    """Register the label routes (:mod:`wsi_ssl.serve.labels`) on ``app``."""
    book = LabelBook(service.index.root)

    @app.get("/api/slides/{slide}/concept.png")
    async def concept(
        slide: str,
        label: Annotated[Label, QueryParam(max_length=1000)] = "positive",
        index: IndexName = None,
    ) -> Response:
        data, skipped = await pool.run(concept_map, service, book, slide, label, index)
        headers = {"Cache-Control": "no-cache", "X-Skipped-Regions": str(skipped)}
        return Response(data, media_type="image/png", headers=headers)

    @app.get("/api/labels")
    def labels() -> dict[str, Any]:
        return book.to_dict()

    @app.post("/api/labels")
    def set_label(request: LabelRequest) -> dict[str, Any]:
        entry = service.index_for(request.index).resolve_slide(request.slide)
        _, _, w, h = request.box
        if w <= 0 or h <= 0 or max(abs(v) for v in request.box) >= 2**31:
            raise ConfigError(
                f"box {list(request.box)} must have width and height > 0, each value within ±2**31"
            )
        if request.verdict != "clear":  # a label is kept for a slide that can be opened
            service.store(entry["slide_id"], request.index)  # gone: StoreGoneError (404)
        width, height = (int(v) for v in entry["dimensions"])
        box = clip_box(request.box, (width, height))
        if box is None:
            raise RegionOutsideSlideError(
                f"box {list(request.box)} lies outside {entry['name']} ({width} x {height} px)"
            )
        record = (entry["slide_id"], *box, request.label)
        book.set(record, request.verdict, entry["name"], (width, height))
        return book.to_dict()

    @app.post("/api/labels/more")
    def more(request: MoreRequest) -> dict[str, Any]:
        return more_like(service, book, request.label, request.k, request.index)


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": redact_paths(message), "type": kind}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    said: set[str] = set()  # the archive's troubles logged, each once (a viewer asks often)

    @app.exception_handler(WsiSslError)
    async def library_error(request: Request, exc: WsiSslError) -> JSONResponse:
        if isinstance(exc, StoreNotFoundError | TilingMismatchError | EmbeddingsNotFoundError):
            _log_once(said, exc)  # the archive changed under the server: its operator's to fix
        if isinstance(exc, UnknownSlideError | IndexNotFoundError | StoreNotFoundError):
            status = 404  # a slide's store gone from the archive too (StoreGoneError)
        elif isinstance(exc, FormulaLabelError):
            status = 422  # a new label a spreadsheet would take for a formula
        elif isinstance(exc, USER_ERRORS):
            status = 400
        elif isinstance(exc, StoreIncompleteError | StoreLockedError):
            status = 503  # being re-tiled, or the label files being written: try again
        elif isinstance(exc, TilingMismatchError | EmbeddingsNotFoundError):
            status = 409  # re-tiled since indexing: re-embed and `index --add`
        else:  # the archive or the index is damaged: the server's fault, not the request's
            status = 500
            log.error("%s: %s", type(exc).__name__, exc)
        return _error(status, str(exc), type(exc).__name__)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """Which fields are wrong and why, never the values sent."""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: "
            + str(e["msg"]).removeprefix("Value error, ")  # a validator's own message
            for e in exc.errors()
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


def _log_once(said: set[str], exc: WsiSslError) -> None:
    """Log ``exc`` (with its path) as a warning unless it was logged before."""
    path = getattr(exc, "path", None)
    named = path is None or str(path) in str(exc)
    message = f"{exc}" + ("" if named else f" (store {path})")
    if message not in said:
        said.add(message)
        log.warning("%s", message)


def create_app(
    index: SearchIndex,
    *,
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS,
    token: str | None = None,
    render_workers: int | None = None,
    render_queue: int = 64,
    cache_bytes: int = 128 << 20,
    slide_labels: str | Path | Mapping[str, str] | None = None,
    mil_predictions: str | Path | None = None,
    max_image_bytes: int = MAX_UPLOAD_BYTES,
) -> Guard:
    """The ASGI application serving ``index`` (see the module docstring for the routes).

    Args:
        index: the search index to serve.
        allowed_hosts: ``Host`` names answered (loopback names by default; ``"*"`` for any).
        token: an access token every request must carry (None: none needed).
        render_workers: threads drawing pictures (default: half the CPUs, at least 1).
        render_queue: picture requests that may wait beyond those being drawn (then 503).
        cache_bytes: bound of the picture cache.
        slide_labels: a ``slide,label`` CSV (or a slide id -> label mapping) for the label
            filter; default: the archive's ``labels/slides.csv`` when there is one.
        mil_predictions: the folder ``wsi-ssl mil predict`` wrote (or its run directory),
            for the attention layer and the predicted class of each slide.
        max_image_bytes: the largest uploaded query picture.

    Size: the routes are closures over one shared state, declared together so the page's
    whole API reads in one place.
    """
    if slide_labels is None and (index.root / SLIDE_LABELS).is_file():
        slide_labels = index.root / SLIDE_LABELS
    if isinstance(slide_labels, str | Path):
        slide_labels = read_slide_labels(index, slide_labels)
    mil = MilPredictions(mil_predictions) if mil_predictions is not None else None
    service = SlideService(index, cache_bytes=cache_bytes, slide_labels=slide_labels)
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
    def describe(index: IndexName = None) -> dict[str, Any]:
        return service.describe(index)

    @app.get("/api/slides")
    def slides(index: IndexName = None) -> list[dict[str, Any]]:
        return service.slides(index)

    @app.get("/api/slides/{slide}")
    def slide(slide: str, index: IndexName = None) -> dict[str, Any]:
        return service.slide(slide, index)

    @app.post("/api/search")
    def search(request: SearchRequest) -> dict[str, Any]:
        return service.search(
            request.slide,
            request.box,
            k=request.k,
            mode=request.mode,
            exclude_self=request.exclude_self,
            index=request.index,
            labels=request.labels,
        )

    @app.post(UPLOAD_PATH)
    async def search_image(
        request: Request,
        k: int = QueryParam(8, ge=1, le=MAX_K),
        mode: Literal["regions", "tiles", "slides"] = "regions",
        index: IndexName = None,
        image_mpp: float | None = QueryParam(None, gt=0, lt=1000),
        labels: str = QueryParam("", max_length=2000),
    ) -> dict[str, Any]:
        data = await request.body()  # Guard has checked its type and size
        if not data:
            raise ConfigError("the request carries no picture; send PNG, JPEG or TIFF bytes")
        wanted = [v for v in labels.split(",") if v]
        return await pool.run(
            lambda: service.search_image(
                data, k=k, mode=mode, index=index, image_mpp=image_mpp, labels=wanted
            )
        )

    add_picture_routes(app, service, pool)
    _add_label_routes(app, service, pool)
    add_layer_routes(app, service, pool, mil)
    config = GuardConfig(
        allowed_hosts=allowed_hosts,
        token=token,
        upload_paths=(UPLOAD_PATH,),
        max_upload=max_image_bytes,
    )
    return Guard(app, config)
