"""Overlay layers of the viewer: tile QC, annotations and MIL attention.

Each layer is a translucent RGBA PNG at the slide's thumbnail size, one square per stored tile
(the page lays it over the whole slide, like the concept map):

* ``qc``: tiles flagged by QC (:func:`wsi_ssl.tiling.qc.kept_tiles`, the thresholds the store
  was tiled with) red, tiles that pass faint green; only for stores tiled with QC scores;
* ``annotations``: each tile in the colour of its largest class of ``labels/annotations``
  (the tiling's annotation fractions), opacity growing with that fraction;
* ``attention``: the MIL attention percentile of each tile (``wsi-ssl mil predict``'s
  ``geojson/<slide_id>.geojson``, ``measurements.attention_percentile``), from faint dark
  blue (least attended) through grey to opaque yellow (most; cividis, so never QC's red);
  only where a predictions folder was given.

Routes: ``GET /api/slides/{slide}/layers`` (which layers the slide has, with the QC counts,
the annotation classes, the MIL prediction and ``attention_colours``: the attention layer's
RGBA at percentiles 0, 0.25, .., 1, for the page's legend) and
``GET /api/slides/{slide}/layers/NAME.png``, each with ``?index=NAME`` (the index ``slide`` is
looked up in).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from fastapi import FastAPI
from fastapi.responses import Response

from wsi_ssl.errors import ConfigError, NoLabelsError
from wsi_ssl.serve.pictures import IndexName

if TYPE_CHECKING:
    from wsi_ssl.serve.service import RenderPool, SlideService
    from wsi_ssl.storage import SlideStore

__all__ = ["MilPredictions", "add_layer_routes", "tile_layer"]

Layer = Literal["qc", "annotations", "attention"]
QC_PASS = (40, 160, 60, 50)
QC_FLAGGED = (220, 30, 30, 180)
ATTENTION_STOPS = np.array([(0, 34, 78), (124, 123, 120), (254, 232, 56)], dtype=np.float64)
"""The attention layer's colours at percentiles 0, 0.5 and 1 (matplotlib's cividis)."""
PALETTE = np.array(
    [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
     (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)],
    dtype=np.uint8,
)  # fmt: skip
"""Class colours of the annotation layer (matplotlib's tab10), by class index."""


def tile_layer(store: SlideStore, colours: np.ndarray, boxes: np.ndarray | None = None) -> bytes:
    """PNG of ``colours`` (N, 4) uint8 RGBA, one per tile of ``store`` (or per level-0 box of
    ``boxes`` (N, 4) x, y, w, h), each filling its square at the thumbnail's size."""
    from PIL import Image

    from wsi_ssl.serve.pyramid import encode

    h, w = store.thumbnail.shape[:2]
    f = w / float(store.source["dimensions"][0])
    if boxes is None:
        side = float(store.tiling["tile_size_level0"])
        boxes = np.concatenate([store.coords, np.full((store.n_tiles, 2), side)], axis=1)
    raster = np.zeros((h, w, 4), dtype=np.uint8)
    for (x, y, bw, bh), colour in zip(np.asarray(boxes, dtype=np.float64), colours, strict=True):
        x0, y0 = max(0, int(x * f)), max(0, int(y * f))
        x1, y1 = max(x0 + 1, round((x + bw) * f)), max(y0 + 1, round((y + bh) * f))
        raster[y0:y1, x0:x1] = colour
    return encode(Image.fromarray(raster, "RGBA"), "png")


def qc_colours(store: SlideStore) -> np.ndarray:
    """RGBA per tile: flagged red, passing faint green (ConfigError without QC scores)."""
    from wsi_ssl.tiling.qc import kept_tiles

    if not store.qc():
        raise ConfigError(f"slide {store.slide_id} was tiled without QC scores; no QC layer")
    kept = kept_tiles(store)
    return np.where(kept[:, None], np.array(QC_PASS, np.uint8), np.array(QC_FLAGGED, np.uint8))


def annotation_colours(store: SlideStore) -> np.ndarray:
    """RGBA per tile: its largest class's colour, opacity 200 x that class's fraction."""
    fractions, _ = store.labels("annotations")
    best = fractions.argmax(axis=1) if fractions.shape[1] else np.zeros(len(fractions), int)
    top = fractions.max(axis=1) if fractions.shape[1] else np.zeros(len(fractions))
    alpha = np.round(200 * np.clip(top, 0, 1)).astype(np.uint8)
    return np.concatenate([PALETTE[best % len(PALETTE)], alpha[:, None]], axis=1)


class MilPredictions:
    """The output folder of ``wsi-ssl mil predict`` (given a run directory: its
    ``predictions/``, not the run's own out-of-fold ``predictions.csv``, which has no
    attention)."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        if (folder / "run.json").is_file() or not (folder / "predictions.csv").is_file():
            if not (folder / "predictions" / "predictions.csv").is_file():
                raise ConfigError(
                    f"{folder}: no predictions of `wsi-ssl mil predict` (RUN/predictions by "
                    "default); run it on the archive's slides first, or pass the folder it wrote"
                )
            folder = folder / "predictions"
        self.folder = folder

    def prediction(self, slide_id: str) -> dict[str, Any] | None:
        """``{"predicted", "probabilities", "attention"}`` of ``slide_id``, or None."""
        with (self.folder / "predictions.csv").open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("slide_id") == slide_id:
                    probs = {
                        k.removeprefix("prob_"): float(v)
                        for k, v in row.items()
                        if k.startswith("prob_") and v
                    }
                    has = (self.folder / "geojson" / f"{slide_id}.geojson").is_file()
                    return {"predicted": row["predicted"], "probabilities": probs, "attention": has}
        return None

    def attention(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 boxes (N, 4) and attention percentiles (N,) of ``slide_id``'s tiles."""
        path = self.folder / "geojson" / f"{slide_id}.geojson"
        if not path.is_file():
            raise ConfigError(f"slide {slide_id} has no MIL attention in the predictions given")
        boxes, values = [], []
        for feature in json.loads(path.read_text())["features"]:
            ring = np.asarray(feature["geometry"]["coordinates"][0], dtype=np.float64)
            (x0, y0), (x1, y1) = ring.min(axis=0), ring.max(axis=0)
            boxes.append((x0, y0, x1 - x0, y1 - y0))
            values.append(float(feature["properties"]["measurements"]["attention_percentile"]))
        return np.asarray(boxes).reshape(-1, 4), np.asarray(values)


def attention_colours(values: np.ndarray) -> np.ndarray:
    """RGBA per tile from attention percentiles 0..1: ``ATTENTION_STOPS`` interpolated, from
    faint (alpha 20) to opaque (220)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0, 1)
    at = np.linspace(0, 1, len(ATTENTION_STOPS))
    out = np.zeros((len(v), 4), dtype=np.uint8)
    for channel in range(3):
        out[:, channel] = np.round(np.interp(v, at, ATTENTION_STOPS[:, channel]))
    out[:, 3] = np.round(20 + 200 * v)
    return out


def describe_layers(
    service: SlideService, mil: MilPredictions | None, slide: str, index: str | None = None
) -> dict[str, Any]:
    """Which layers ``slide`` (of index ``index``) has (None where it has none)."""
    from wsi_ssl.tiling.qc import kept_tiles

    store = service.store(slide, index)
    scores = store.qc()
    qc = None
    if scores:
        kept = kept_tiles(store)
        qc = {"metrics": sorted(scores), "flagged": int((~kept).sum()), "n_tiles": store.n_tiles}
    try:
        _, classes = store.labels("annotations")
        annotations: dict[str, Any] | None = {
            "classes": [
                {"name": c, "colour": [int(v) for v in PALETTE[i % len(PALETTE)]]}
                for i, c in enumerate(classes)
            ]
        }
    except NoLabelsError:
        annotations = None
    prediction = mil.prediction(store.slide_id) if mil is not None else None
    legend = [[int(v) for v in c] for c in attention_colours(np.linspace(0, 1, 5))]
    return {
        "slide_id": store.slide_id,
        "qc": qc,
        "annotations": annotations,
        "mil": prediction,
        "attention_colours": legend,
    }


def draw_layer(
    service: SlideService,
    mil: MilPredictions | None,
    slide: str,
    name: Layer,
    index: str | None = None,
) -> bytes:
    """The PNG of layer ``name`` over ``slide`` of index ``index`` (ConfigError where the
    slide has none)."""
    store = service.store(slide, index)
    if name == "qc":
        return tile_layer(store, qc_colours(store))
    if name == "annotations":
        try:
            return tile_layer(store, annotation_colours(store))
        except NoLabelsError:
            raise ConfigError(
                f"slide {store.slide_id} was tiled without annotations; no annotation layer"
            ) from None
    if mil is None:
        raise ConfigError("no MIL predictions were given to the server (mil_predictions=)")
    boxes, values = mil.attention(store.slide_id)
    return tile_layer(store, attention_colours(values), boxes)


def add_layer_routes(
    app: FastAPI, service: SlideService, pool: RenderPool, mil: MilPredictions | None
) -> None:
    """Register the layer routes of the module docstring on ``app``."""

    @app.get("/api/slides/{slide}/layers")
    async def layers(slide: str, index: IndexName = None) -> dict[str, Any]:
        return await pool.run(describe_layers, service, mil, slide, index)

    @app.get("/api/slides/{slide}/layers/{name}.png")
    async def layer(slide: str, name: Layer, index: IndexName = None) -> Response:
        stamp = _file_stamp(mil, name)

        def draw() -> bytes:
            return draw_layer(service, mil, slide, name, index)

        data = await pool.run(service.picture, slide, ("layer", name, stamp), draw, index)
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-cache"})


def _file_stamp(mil: MilPredictions | None, name: str) -> int:
    """The predictions' mtime for the attention layer (a new prediction is redrawn)."""
    if name != "attention" or mil is None:
        return 0
    path = mil.folder / "predictions.csv"
    return path.stat().st_mtime_ns if path.is_file() else 0
