"""Which tiles drove a prediction: attention heatmap over the thumbnail, a gallery of the
most attended tiles, and the attention of every tile as GeoJSON for QuPath.

Raw attention weights sum to 1 over a bag, so their scale depends on the bag size. Heatmaps
show either ``a / max(a)`` ("max", the default: a few decisive tiles stand out, as they do
in the attention itself) or the percentile rank within the slide ("percentile", as CLAM's
heatmaps do: even contrast, but a single decisive tile looks like any top-ranked one). The
GeoJSON carries the weight, its percentile and ``a × N`` (attention relative to uniform).

A bag may hold fewer tiles than the store (a ``skip_flagged_tiles`` run leaves QC-flagged
tiles out; tiles without a vector are never in it): given the bag's rows (``tiles``, the
prediction's :attr:`~wsi_ssl.mil.run.MILPrediction.bag_tiles`), the heatmap leaves the other
tiles uncoloured (the thumbnail shows through), the gallery and the GeoJSON leave them out, and N, the percentiles and the ranks count the bag's tiles only.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wsi_ssl.errors import SchemaMismatchError
from wsi_ssl.storage import SlideStore
from wsi_ssl.storage.tile_reader import TileReader

__all__ = [
    "COLORMAP",
    "SCALES",
    "attention_geojson",
    "attention_heatmap",
    "attention_overlay",
    "percentile_ranks",
    "scaled_attention",
    "tile_gallery",
]

COLORMAP = "turbo"
SCALES = ("max", "percentile")
MIN_SIDE = 800
"""Small thumbnails are enlarged (nearest neighbour) to at least this long side."""
_NAMESPACE = uuid.UUID("5b0c3e1e-6a51-4d6c-9a43-3f4d2f6b8e10")


def percentile_ranks(attention: np.ndarray) -> np.ndarray:
    """Each tile's attention rank in [0, 1] (0 the least, 1 the most attended; ties share)."""
    a = np.asarray(attention, dtype=np.float64)
    if len(a) < 2:
        return np.ones(len(a))
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a))
    # ties: the mean rank of their group
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse] / (len(a) - 1)


def scaled_attention(attention: np.ndarray, scale: str = "max") -> np.ndarray:
    """Attention mapped to [0, 1] for colouring: ``a / max(a)`` or the percentile rank."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}; got {scale!r}")
    a = np.asarray(attention, dtype=np.float64)
    if scale == "percentile":
        return percentile_ranks(a)
    top = a.max() if len(a) else 1.0
    return a / top if top > 0 else np.ones_like(a)


def _geometry(store: SlideStore) -> tuple[float, float, float]:
    """(thumbnail px per level-0 px in x, in y, tile edge in level-0 px)."""
    h, w = store.thumbnail.shape[:2]
    width, height = store.source["dimensions"]
    return w / width, h / height, float(store.tiling["tile_size_level0"])


def _check(store: SlideStore, attention: np.ndarray, coords: np.ndarray) -> None:
    if np.ndim(attention) != 1 or not np.isfinite(attention).all():  # drew NaN tiles blank
        raise SchemaMismatchError(
            f"{store.path}: attention must be (N,) finite weights, got shape "
            f"{np.shape(attention)} with {int(np.sum(~np.isfinite(attention)))} not finite; use "
            "the attention of run.predict_slide(store)"
        )
    if len(attention) != len(coords):
        raise SchemaMismatchError(
            f"{store.path}: {len(attention)} attention values for {len(coords)} tiles; use the "
            "attention of run.predict_slide(store), which covers every tile of the store (0 for "
            "tiles without a vector)"
        )


def _bag(attention: np.ndarray, tiles: np.ndarray | None) -> np.ndarray:
    """The store rows in the bag: ``tiles`` (checked against the attention), else every row."""
    if tiles is None:
        return np.arange(len(attention))
    rows = np.asarray(tiles, dtype=np.int64)
    if rows.ndim != 1 or len(rows) == 0 or rows.min() < 0 or rows.max() >= len(attention):
        raise SchemaMismatchError(
            f"tiles must be the store rows in the bag (0..{len(attention) - 1}), got "
            f"{len(rows)} rows; use the bag_tiles of run.predict_slide(store)"
        )
    return rows


def attention_heatmap(
    store: SlideStore,
    attention: np.ndarray,
    out: str | Path,
    *,
    title: str | None = None,
    scale: str = "max",
    alpha: tuple[float, float] = (0.3, 0.75),
    tiles: np.ndarray | None = None,
) -> Path:
    """Save the thumbnail with each tile of the bag coloured by its attention, as PNG.

    Args:
        store: the slide's store (thumbnail, coords, geometry).
        attention: (N,) tile weights aligned with ``store.coords``.
        out: PNG path.
        title: figure title (e.g. the slide name and the predicted class).
        scale: "max" (``a / max(a)``) or "percentile" (rank within the slide).
        alpha: opacity of the colour over a tile, from the least to the most attended, so
            the tissue stays visible where attention is low.
        tiles: the store rows in the bag (None: every tile); the others stay uncoloured,
            and the scale counts the bag's tiles only.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    blended = attention_overlay(store, attention, scale=scale, alpha=alpha, tiles=tiles)
    cmap = colormaps[COLORMAP]
    h, w = blended.shape[:2]

    inches = 8.0
    top = 0.4 if title else 0.05  # inches above the image for the title
    image_h = 0.88 * inches * h / w
    fig = Figure(figsize=(inches, image_h + top), dpi=max(100, int(w / (0.88 * inches))))
    ax = fig.add_axes((0.0, 0.0, 0.88, image_h / (image_h + top)))
    ax.imshow(blended, interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.1 / (image_h + top))
    cax = fig.add_axes((0.9, 0.1, 0.02, 0.7 * image_h / (image_h + top)))
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), cax=cax)
    label = "attention / max attention" if scale == "max" else "attention percentile in slide"
    bar.set_label(label, fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def attention_overlay(
    store: SlideStore,
    attention: np.ndarray,
    *,
    scale: str = "max",
    alpha: tuple[float, float] = (0.3, 0.75),
    tiles: np.ndarray | None = None,
) -> np.ndarray:
    """The thumbnail (enlarged to at least ``MIN_SIDE`` px) with each tile of the bag
    coloured by its attention, uint8 (h, w, 3); tiles outside the bag stay uncoloured
    (arguments as :func:`attention_heatmap`'s)."""
    from matplotlib import colormaps

    coords = store.coords
    _check(store, attention, coords)
    thumb = store.thumbnail
    zoom = max(1, MIN_SIDE // max(thumb.shape[:2]))
    if zoom > 1:
        thumb = np.repeat(np.repeat(thumb, zoom, axis=0), zoom, axis=1)
    sx, sy, side = _geometry(store)
    sx, sy = sx * zoom, sy * zoom
    h, w = thumb.shape[:2]
    bag = _bag(attention, tiles)
    raster = np.full((h, w), np.nan)
    values = scaled_attention(attention[bag], scale)
    for (x, y), r in zip(coords[bag], values, strict=True):
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = max(x0 + 1, round((x + side) * sx)), max(y0 + 1, round((y + side) * sy))
        cell = raster[y0:y1, x0:x1]
        np.fmax(cell, r, out=cell)
    cmap = colormaps[COLORMAP]
    v = np.nan_to_num(raster)
    colour = cmap(v)[..., :3] * 255
    opacity = (alpha[0] + (alpha[1] - alpha[0]) * v)[..., None]
    covered = ~np.isnan(raster)[..., None]
    return np.where(covered, (1 - opacity) * thumb + opacity * colour, thumb).astype(np.uint8)


def tile_gallery(
    store: SlideStore,
    attention: np.ndarray,
    out: str | Path,
    *,
    k: int = 16,
    columns: int = 4,
    size: int = 224,
    tiles: np.ndarray | None = None,
) -> Path | None:
    """Save the ``k`` most attended tiles as a captioned grid PNG (None: store has no tiles).

    Each caption gives the rank, the attention relative to uniform (``a × N``, N the tiles in
    the bag: 1 means average) and the tile's level-0 x, y. ``tiles``: the store rows in the
    bag (None: every tile); the others are never shown.
    """
    if "tiles" not in store.group:
        return None
    coords = store.coords
    _check(store, attention, coords)
    a = np.asarray(attention, dtype=np.float64)
    bag = _bag(a, tiles)
    top = bag[np.argsort(-a[bag], kind="stable")][: min(k, len(bag))]
    pixels = TileReader(store.tiles).read(top)
    font = ImageFont.load_default(size=13)
    caption = 20
    rows = max(1, -(-len(top) // columns))
    cols = min(columns, max(1, len(top)))
    sheet = Image.new("RGB", (cols * (size + 4) + 4, rows * (size + caption + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for rank, i in enumerate(top):
        tile = Image.fromarray(pixels[rank]).convert("RGB")
        if tile.size != (size, size):
            tile = tile.resize((size, size), Image.Resampling.BILINEAR)
        r, c = divmod(rank, columns)
        x0, y0 = 4 + c * (size + 4), 4 + r * (size + caption + 4)
        sheet.paste(tile, (x0, y0 + caption))
        x, y = (int(v) for v in coords[i])
        text = f"#{rank + 1}  {a[i] * len(bag):.1f}x  ({x}, {y})"
        draw.text((x0 + 2, y0 + 3), text, fill=(0, 0, 0), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def attention_geojson(
    store: SlideStore,
    attention: np.ndarray,
    out: str | Path,
    *,
    properties: dict[str, Any] | None = None,
    scale: str = "max",
    tiles: np.ndarray | None = None,
) -> Path:
    """Save every tile of the bag as a QuPath tile object carrying its attention, as GeoJSON.

    Polygons are tile squares in level-0 pixels (QuPath's image coordinates). Each feature's
    ``properties`` hold ``objectType: "tile"``, a ``color`` from the heatmap's colour map and
    ``scale`` (so QuPath draws the heatmap as is) and ``measurements``: ``attention`` (the
    weight; sums to 1 over the slide), ``attention_percentile`` (0..1) and
    ``attention_x_uniform`` (``a × N``: 1 is an average tile), all over the bag's N tiles.
    Tiles outside the bag (not in ``tiles``) have no feature: QuPath shows nothing there. A
    feature's id and name keep the tile's store row ``i``.
    In QuPath: File > Import objects (or drag the file onto the slide), then Measure > Show
    measurement maps > attention_percentile.

    Args:
        properties: extra members of the FeatureCollection (e.g. the prediction).
        tiles: the store rows in the bag (None: every tile).
    """
    from matplotlib import colormaps

    coords = store.coords
    _check(store, attention, coords)
    _, _, side = _geometry(store)
    bag = _bag(attention, tiles)
    a = np.asarray(attention, dtype=np.float64)[bag]
    ranks = percentile_ranks(a)
    colours = (colormaps[COLORMAP](scaled_attention(a, scale))[:, :3] * 255).round().astype(int)
    n = len(a)
    features = []
    rows = zip(bag.tolist(), coords[bag].tolist(), a, ranks, colours, strict=True)
    for i, (x, y), v, r, rgb in rows:
        x1, y1 = x + side, y + side
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_NAMESPACE, f"{store.slide_id}:{i}")),
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]],
                },
                "properties": {
                    "objectType": "tile",
                    "name": f"tile {i}",
                    "color": [int(c) for c in rgb],
                    "measurements": {
                        "attention": float(v),
                        "attention_percentile": round(float(r), 6),
                        "attention_x_uniform": round(float(v * n), 6),
                    },
                },
            }
        )
    doc = {"type": "FeatureCollection", "features": features, **(properties or {})}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc))
    return out
