"""Picture routes: thumbnails, region pictures and the deep-zoom (DZI) tiles of the viewer.

Each takes ``?index=NAME``: the index ``slide`` is looked up in (default: the one served).

* ``GET /api/slides/{slide}/thumbnail.png``: the stored thumbnail.
* ``GET /api/slides/{slide}/region.png?box=X,Y,W,H[&outline=ROWS][&role=query][&px=N]``:
  level-0 ``box``, longest side ``px``; up to ``MAX_PICTURE_TILES`` stored tiles drawn exactly
  (the listed rows outlined in the hit colour, or the query's with ``role=query``), a larger
  box from the deep-zoom sources (bounded cost whatever its size).
* ``GET /api/slides/{slide}/dzi/{version}/{source}.dzi`` and
  ``.../dzi/{version}/{source}_files/{level}/{col}_{row}.jpeg``: the Deep Zoom pyramid,
  ``source`` = ``slide`` (the slide file through its reader) or ``tiles`` (the stored tiles);
  see :mod:`wsi_ssl.serve.pyramid`. ``version`` (from ``/api/slides/{slide}``) changes with
  the store, so browsers may cache these tiles; the server always draws the current store.

Every picture is drawn in the bounded :class:`RenderPool` and cached (LRU, bounded bytes), keyed
by the store's stamp so a changed store is never answered from the cache.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from fastapi import FastAPI
from fastapi import Query as QueryParam
from fastapi.responses import Response

from wsi_ssl.errors import ConfigError, RegionOutsideSlideError
from wsi_ssl.serve.pyramid import dzi_xml, encode, tiles_in
from wsi_ssl.serve.service import RenderPool, SlideService

__all__ = ["IndexName", "add_picture_routes", "parse_box"]

PANEL_PX = (32, 1024)
MAX_PICTURE_TILES = 100
"""A region picture draws at most this many stored tiles; a larger box comes from the pyramid."""
MAX_COORD = 2**31
MAX_OUTLINE = 1000
Role = Literal["hit", "query"]
"""Whose tiles a region picture outlines: a hit's (orange) or the query's (blue)."""
IndexName = Annotated[str | None, QueryParam(max_length=200)]
"""The ``?index=`` of a request: the index its slide is looked up in (None: the default)."""


def parse_box(text: str) -> tuple[int, int, int, int]:
    """``X,Y,W,H`` (level-0 px, each within ±2**31) as integers."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) and abs(v) < MAX_COORD for v in values):
        raise ConfigError(
            f"box must be X,Y,W,H in level-0 pixels, each within ±2**31, got {text[:80]!r}"
        )
    x, y, w, h = (round(v) for v in values)
    if w <= 0 or h <= 0:
        raise ConfigError(f"box {text[:80]!r} has no area; width and height must be > 0")
    return x, y, w, h


def _parse_rows(text: str) -> set[int]:
    parts = [v for v in text.split(",") if v]
    if len(parts) > MAX_OUTLINE:
        raise ConfigError(f"outline lists {len(parts)} tiles; at most {MAX_OUTLINE}")
    try:
        return {int(v) for v in parts}
    except ValueError:
        raise ConfigError(
            f"outline must be tile rows separated by commas, got {text[:80]!r}"
        ) from None


def _image(data: bytes, media: str, cache: str = "no-cache") -> Response:
    """A picture; ``no-cache`` unless its URL changes with the store (DZI tiles)."""
    return Response(data, media_type=media, headers={"Cache-Control": cache})


def _region_png(
    service: SlideService,
    slide: str,
    box: tuple[int, int, int, int],
    outline: set[int],
    px: int,
    index: str | None,
    role: Role = "hit",
) -> bytes:
    from wsi_ssl.search.gallery import HIT_COLOUR, QUERY_COLOUR, region_mosaic

    store = service.store(slide, index)
    width, height = (int(v) for v in store.source["dimensions"])
    x, y, w, h = box
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:  # as searches refuse it
        raise RegionOutsideSlideError(
            f"box {list(box)} lies outside {store.slide_id} ({width} x {height} px)"
        )
    if len(tiles_in(store, box)) <= MAX_PICTURE_TILES:
        colour = QUERY_COLOUR if role == "query" else HIT_COLOUR
        picture = region_mosaic(store, box, panel_px=px, outline=outline or None, colour=colour)
        return encode(picture, "png")
    f = px / max(box[2], box[3])
    size = (max(1, round(box[2] * f)), max(1, round(box[3] * f)))
    return encode(service.pyramid(slide, index).region(box, size, "slide"), "png")


def add_picture_routes(app: FastAPI, service: SlideService, pool: RenderPool) -> None:
    """Register the picture routes of the module docstring on ``app``; everything that touches
    the disk runs in ``pool``, never on the event loop."""

    @app.get("/api/slides/{slide}/thumbnail.png")
    async def thumbnail(slide: str, index: IndexName = None) -> Response:
        def draw() -> bytes:
            return encode(service.pyramid(slide, index).thumbnail, "png")

        data = await pool.run(service.picture, slide, ("thumb",), draw, index)
        return _image(data, "image/png")

    @app.get("/api/slides/{slide}/region.png")
    async def region(
        slide: str,
        box: str,
        outline: str = "",
        role: Role = "hit",
        px: int = 320,
        index: IndexName = None,
    ) -> Response:
        if not PANEL_PX[0] <= px <= PANEL_PX[1]:
            raise ConfigError(f"px must be in {PANEL_PX[0]}..{PANEL_PX[1]}, got {px}")
        parsed, rows = parse_box(box), _parse_rows(outline)
        key = ("region", parsed, tuple(sorted(rows)), px, role)
        draw = lambda: _region_png(service, slide, parsed, rows, px, index, role)  # noqa: E731
        return _image(await pool.run(service.picture, slide, key, draw, index), "image/png")

    @app.get("/api/slides/{slide}/dzi/{version}/{source}.dzi")
    async def dzi(
        slide: str, version: str, source: Literal["slide", "tiles"], index: IndexName = None
    ) -> Response:
        pyramid = await pool.run(service.pyramid, slide, index)
        return Response(dzi_xml(pyramid), media_type="application/xml")

    @app.get("/api/slides/{slide}/dzi/{version}/{source}_files/{level}/{col}_{row}.jpeg")
    async def dzi_tile(
        slide: str,
        version: str,
        source: Literal["slide", "tiles"],
        level: int,
        col: int,
        row: int,
        index: IndexName = None,
    ) -> Response:
        def draw() -> bytes:
            return encode(service.pyramid(slide, index).tile(level, col, row, source), "jpeg")

        key = ("dzi", source, level, col, row)
        data = await pool.run(service.picture, slide, key, draw, index)
        return _image(data, "image/jpeg", "private, max-age=3600")
