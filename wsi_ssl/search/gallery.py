"""Gallery picture (PNG or JPEG, as its name's suffix says): the query region beside its top hits, drawn from the tile stores.

Each panel is a mosaic of the stored tiles that overlap the region (glass and unstored
positions light grey), scaled to ``panel_px``; tiles that matched a query tile are outlined.
Slide hits show the slide's thumbnail with its best region outlined. Titles give the rank,
slide name and score.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl.errors import ConfigError
from wsi_ssl.storage.atomic import atomic_write_with

if TYPE_CHECKING:
    from wsi_ssl.search.results import SearchResult
    from wsi_ssl.storage import Archive, SlideStore

__all__ = ["gallery_format", "paste_tiles", "region_mosaic", "render_gallery"]

GALLERY_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
"""The picture formats a gallery is written in, by the suffix of its file name."""
BACKGROUND = (232, 232, 232)
MAX_MOSAIC_TILES = 900
"""Regions with more tiles than this are drawn from the slide thumbnail instead."""


def gallery_format(out: str | Path) -> str:
    """The format a gallery named ``out`` is written in: its suffix's (.png, .jpg, .jpeg).

    Raises:
        ConfigError: another suffix (the picture would not be what its name says).
    """
    suffix = Path(out).suffix.lower()
    if suffix not in GALLERY_FORMATS:
        what = f"{suffix} names neither" if suffix else "it has no suffix"
        stem = Path(out).with_suffix("").name or "gallery"
        raise ConfigError(
            f"{out}: a gallery is written as PNG or JPEG, as its name's suffix says, and "
            f"{what}; name it {stem}.png or {stem}.jpg"
        )
    return GALLERY_FORMATS[suffix]


def _fit(image: Any, side: int) -> Any:
    from PIL import Image

    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST)


def paste_tiles(
    canvas: Any,
    tiles: Any,
    coords: np.ndarray,
    origin: tuple[float, float],
    size0: float,
    scale: float,
) -> None:
    """Paste stored ``tiles`` (at level-0 ``coords``, ``size0`` px wide) on ``canvas``, whose
    pixel (0, 0) is level-0 ``origin``, at ``scale`` output px per level-0 px. Each tile spans
    its rounded start to the rounded start of the next, so adjacent tiles leave no seam."""
    from PIL import Image

    for (cx, cy), pixels in zip(coords, tiles, strict=True):
        x0, y0 = round((cx - origin[0]) * scale), round((cy - origin[1]) * scale)
        x1, y1 = round((cx + size0 - origin[0]) * scale), round((cy + size0 - origin[1]) * scale)
        tile = Image.fromarray(np.asarray(pixels)).resize(
            (max(1, x1 - x0), max(1, y1 - y0)), Image.Resampling.LANCZOS
        )
        canvas.paste(tile, (x0, y0))


HIT_COLOUR = (230, 120, 20)
"""Outline of a hit's matched tiles (the web page's ``--hit``)."""
QUERY_COLOUR = (30, 90, 220)
"""Outline of the query's tiles (the web page's ``--query``)."""


def region_mosaic(
    store: SlideStore,
    box: tuple[int, int, int, int],
    *,
    panel_px: int = 320,
    outline: set[int] | None = None,
    colour: tuple[int, int, int] = HIT_COLOUR,
) -> Any:
    """A PIL image of level-0 ``box`` of ``store``, longest side ``panel_px``, from its tiles.

    Tiles are drawn at most at their stored resolution and the result enlarged once, so a
    box smaller than a tile costs no more than that tile.
    """
    from PIL import Image, ImageDraw

    from wsi_ssl.storage.tile_reader import TileReader

    x, y, w, h = (int(v) for v in box)
    w, h = max(1, w), max(1, h)
    final = panel_px / max(w, h)
    size = (max(1, round(w * final)), max(1, round(h * final)))
    coords = store.coords
    size0 = float(store.tiling["tile_size_level0"])
    rows = np.flatnonzero(
        (coords[:, 0] + size0 > x)
        & (coords[:, 0] < x + w)
        & (coords[:, 1] + size0 > y)
        & (coords[:, 1] < y + h)
    )
    if len(rows) > MAX_MOSAIC_TILES:
        return _thumbnail_crop(store, (x, y, w, h), size)
    scale = min(final, int(store.tiling["tile_size"]) / size0)
    canvas = Image.new("RGB", (max(1, round(w * scale)), max(1, round(h * scale))), BACKGROUND)
    paste_tiles(canvas, TileReader(store.tiles).read(rows), coords[rows], (x, y), size0, scale)
    if canvas.size != size:
        canvas = canvas.resize(size, Image.Resampling.LANCZOS)
    if outline:
        draw = ImageDraw.Draw(canvas)
        side = max(1, round(size0 * final))
        for r in rows:
            if int(r) in outline:
                px, py = round((coords[r, 0] - x) * final), round((coords[r, 1] - y) * final)
                draw.rectangle([px, py, px + side - 1, py + side - 1], outline=colour, width=2)
    return canvas


def _thumbnail_crop(
    store: SlideStore, box: tuple[int, int, int, int], size: tuple[int, int]
) -> Any:
    """Level-0 ``box`` cut from the stored thumbnail (for regions of many tiles), at ``size``;
    what lies off the slide is background."""
    from PIL import Image

    thumb = Image.fromarray(store.thumbnail)
    sw, sh = (int(v) for v in store.source["dimensions"])
    sx, sy = thumb.width / sw, thumb.height / sh
    x, y, w, h = box
    canvas = Image.new("RGB", size, BACKGROUND)
    x0, y0, x1, y1 = max(0, x), max(0, y), min(sw, x + w), min(sh, y + h)
    if x1 <= x0 or y1 <= y0:
        return canvas
    f = size[0] / w
    left, top = round(x0 * sx), round(y0 * sy)
    part = thumb.crop((left, top, max(left + 1, round(x1 * sx)), max(top + 1, round(y1 * sy))))
    part = part.resize(
        (max(1, round((x1 - x0) * f)), max(1, round((y1 - y0) * f))), Image.Resampling.LANCZOS
    )
    canvas.paste(part, (round((x0 - x) * f), round((y0 - y) * f)))
    return canvas


def _thumbnail_with_box(
    store: SlideStore, box: tuple[int, int, int, int] | None, panel_px: int
) -> Any:
    from PIL import Image, ImageDraw

    thumb = Image.fromarray(store.thumbnail)
    image = _fit(thumb, panel_px)
    if box is not None:
        s = image.width / store.source["dimensions"][0]
        x, y, w, h = box
        ImageDraw.Draw(image).rectangle(
            [x * s, y * s, (x + w) * s, (y + h) * s], outline=HIT_COLOUR, width=3
        )
    return image


def render_gallery(
    archive: Archive,
    result: SearchResult,
    out: str | Path,
    *,
    max_hits: int | None = None,
    panel_px: int = 320,
    columns: int = 5,
) -> Path:
    """Save the query beside its hits (the first ``max_hits``; None: all) as a PNG or JPEG
    (:func:`gallery_format`: by ``out``'s suffix), five panels a row; returns the path.

    Pictures come from ``archive``'s slide stores; the title names the index the result
    came from (``result.index``).

    Raises:
        ConfigError: ``out`` is named for another format than PNG or JPEG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    picture = gallery_format(out)  # before the drawing: a name it cannot be is refused first
    q = result.query
    panels: list[tuple[Any, str]] = []
    if q.kind == "image" and q.image is not None:
        panels.append(
            (
                _fit(Image.fromarray(q.image), panel_px),
                f"query image\n{q.box[2]}x{q.box[3]} px @ {round(q.size_um[0] / q.box[2], 6):g} µm/px",
            )
        )
    else:
        store = archive.slide(str(q.slide_id))
        own = set(int(t) for t in q.tile_numbers) if q.tile_numbers is not None else None
        if q.kind == "slide":
            image = _thumbnail_with_box(store, None, panel_px)
        else:
            image = region_mosaic(store, q.box, panel_px=panel_px, outline=own, colour=QUERY_COLOUR)
        panels.append(
            (
                image,
                f"query: {_short(q.slide_name or str(q.slide_id))}\n{q.kind} {','.join(map(str, q.box))}",
            )
        )
    stores: dict[str, SlideStore] = {}
    for hit in result.hits[:max_hits]:
        store = stores.setdefault(hit.slide_id, archive.slide(hit.slide_id))
        if result.mode == "tiles":
            ctx = hit.size
            box = (hit.x - ctx, hit.y - ctx, 3 * hit.size, 3 * hit.size)
            image = region_mosaic(store, box, panel_px=panel_px, outline={hit.tile})
        elif result.mode == "regions":
            image = region_mosaic(store, hit.box, panel_px=panel_px, outline=set(hit.tiles))
        else:
            image = _thumbnail_with_box(store, hit.best_box, panel_px)
        panels.append((image, f"#{hit.rank} {_short(hit.name)}\nscore {hit.score:.3f}"))
    info = result.index
    n = len(panels)
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    fig = Figure(figsize=(cols * 2.8, rows * 3.1), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, (image, title) in zip(axes.ravel(), panels, strict=False):
        ax.imshow(np.asarray(image))
        ax.set_title(title, fontsize=8)
    fig.suptitle(
        f"{result.mode} for a {q.kind} query; index {info['name']} ({info['kind']}, "
        f"{info['n_vectors']} tiles)",
        fontsize=9,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out, lambda tmp: fig.savefig(tmp, format=picture))
    return out


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
