"""The search → label loop: accept or reject hits, keep the accepted regions, ask for more.

Verdicts live under the archive root, each file written atomically on every change:

* ``labels/regions.csv``: the accepted regions, ``slide,x,y,w,h,label`` (slide id, level-0
  box), readable by ``wsi-ssl mil`` and ``wsi-ssl evaluate``;
* ``labels/rejected.csv``: the rejected ones, same columns;
* ``labels/geojson/<slide_id>.geojson``: each slide's accepted regions as QuPath annotations
  (a FeatureCollection of rectangles, ``classification.name`` = the label).

The files feed the rest of the pipeline: ``labels/regions.csv`` is evaluation's region task
(``wsi-ssl evaluate --region-labels``, :mod:`wsi_ssl.evaluation.regions`); for MIL,
:func:`write_slide_labels` writes a ``slide,label`` CSV (a slide takes the label of its
accepted regions; slides whose regions disagree are left out). The GeoJSON files are QuPath
annotations: :func:`wsi_ssl.annotations.read_annotations` reads them (tiling ``roi``).

Routes: ``GET /api/labels``; ``POST /api/labels`` ``{slide, box, label, verdict}`` with
verdict ``accept``, ``reject`` or ``clear``; ``POST /api/labels/more`` ``{label, k}``: the
tiles nearest any accepted region of ``label``, outside every labelled box;
``GET /api/slides/{slide}/concept.png?label=L``: the concept map of ``label`` over a slide,
each tile scored 1-NN style (its best cosine similarity to the accepted tiles minus its best
to the rejected ones), drawn at the thumbnail's size as a translucent heatmap on one scale for
the whole archive (transparent at the median score of a sample of the indexed tiles, full at
their 99th percentile), so a slide without the concept stays clear. A labelled box is clipped
to its slide; one that misses the slide is refused.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from fastapi import FastAPI
from fastapi import Query as QueryParam
from fastapi.responses import Response
from pydantic import BaseModel, Field

from wsi_ssl.errors import (
    ConfigError,
    NoTilesInRegionError,
    RegionOutsideSlideError,
    WsiSslError,
)
from wsi_ssl.search.queries import clip_box, on_slide_centres
from wsi_ssl.serve.service import MAX_K, RenderPool, SlideService

if TYPE_CHECKING:
    from wsi_ssl.search.results import Query

__all__ = [
    "SLIDE_LABELS",
    "LabelBook",
    "add_label_routes",
    "slide_labels_from_regions",
    "write_slide_labels",
]

COLUMNS = ("slide", "x", "y", "w", "h", "label")
LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$"
MAX_REGIONS = 10_000
SCALE_SAMPLE = 20_000
"""Indexed tiles (from at most ``SCALE_SLIDES`` slides) a concept map's scale is measured on."""
SCALE_SLIDES = 64
MAX_MORE_FETCH = 4096
"""The most neighbours "more like these" fetches to find ``k`` outside the labelled boxes."""
Record = tuple[str, int, int, int, int, str]
SLIDE_LABELS = "labels/slides.csv"
"""The archive's slide labels (``slide,label``): the server's label filter reads it."""


def _write_text(path: Path, text: str) -> None:
    from wsi_ssl.storage.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _read_csv(path: Path) -> list[Record]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        (r["slide"], int(r["x"]), int(r["y"]), int(r["w"]), int(r["h"]), r["label"]) for r in rows
    ]


def _csv_text(records: list[Record]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(records)
    return buf.getvalue()


def geojson(records: list[Record], name: str) -> dict[str, Any]:
    """QuPath-importable annotations of ``records`` (level-0 rectangles)."""
    features = []
    for _, x, y, w, h, label in records:
        ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "name": name,
                    "classification": {"name": label, "color": [230, 120, 20]},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


class LabelBook:
    """The accepted and rejected regions of one archive (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.dir = Path(root) / "labels"
        self._lock = threading.Lock()
        self.accepted = _read_csv(self.dir / "regions.csv")
        self.rejected = _read_csv(self.dir / "rejected.csv")
        self.scales: dict[str, tuple[tuple[Any, ...], tuple[float, float]]] = {}
        """Per label, its concept-map scale and what it was measured for (index, regions)."""

    def to_dict(self) -> dict[str, Any]:
        def rows(records: list[Record]) -> list[dict[str, Any]]:
            return [dict(zip(COLUMNS, r, strict=True)) for r in records]

        return {
            "accepted": rows(self.accepted),
            "rejected": rows(self.rejected),
            "files": {"csv": "labels/regions.csv", "geojson": "labels/geojson/"},
        }

    def set(
        self,
        record: Record,
        verdict: Literal["accept", "reject", "clear"],
        name: str,
        dimensions: tuple[int, int],
    ) -> None:
        """Record ``verdict`` on the region of ``record`` (a box clipped to its slide of
        ``dimensions``): any earlier verdict on that region is replaced, one kept from before
        boxes were clipped included."""
        with self._lock:
            key = record[:5]

            def other(r: Record) -> bool:
                return r[0] != key[0] or clip_box(r[1:5], dimensions) != key[1:]

            self.accepted = [r for r in self.accepted if other(r)]
            self.rejected = [r for r in self.rejected if other(r)]
            if verdict != "clear":
                if len(self.accepted) + len(self.rejected) >= MAX_REGIONS:
                    raise ConfigError(f"at most {MAX_REGIONS} labelled regions per archive")
                (self.accepted if verdict == "accept" else self.rejected).append(record)
            self._save(record[0], name)

    def _save(self, slide_id: str, name: str) -> None:
        _write_text(self.dir / "regions.csv", _csv_text(self.accepted))
        _write_text(self.dir / "rejected.csv", _csv_text(self.rejected))
        mine = [r for r in self.accepted if r[0] == slide_id]
        text = json.dumps(geojson(mine, name), indent=1) + "\n"
        _write_text(self.dir / "geojson" / f"{slide_id}.geojson", text)


def slide_labels_from_regions(root: str | Path) -> dict[str, str]:
    """Slide id -> the label of its accepted regions (slides whose regions disagree left out)."""
    seen: dict[str, set[str]] = {}
    for slide, *_, label in LabelBook(Path(root)).accepted:
        seen.setdefault(slide, set()).add(label)
    return {slide: next(iter(v)) for slide, v in seen.items() if len(v) == 1}


def write_slide_labels(root: str | Path, out: str | Path | None = None) -> Path:
    """Write :func:`slide_labels_from_regions` as a ``slide,label`` CSV (default
    ``ROOT/labels/slides.csv``), readable by ``wsi_ssl.mil.labels.read_labels``."""
    path = Path(out) if out is not None else Path(root) / SLIDE_LABELS
    labels = slide_labels_from_regions(root)
    if not labels:
        raise ConfigError(f"{root}: no accepted region to label a slide with; accept hits first")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("slide", "label"))
    writer.writerows(sorted(labels.items()))
    _write_text(path, buf.getvalue())
    return path


class LabelRequest(BaseModel):
    """The body of ``POST /api/labels``."""

    slide: str = Field(max_length=200)
    box: tuple[int, int, int, int]
    label: str = Field("positive", pattern=LABEL_PATTERN)
    verdict: Literal["accept", "reject", "clear"] = "accept"


class MoreRequest(BaseModel):
    """The body of ``POST /api/labels/more``."""

    label: str = Field("positive", pattern=LABEL_PATTERN)
    k: int = Field(8, ge=1, le=MAX_K)


def more_like(service: SlideService, book: LabelBook, label: str, k: int) -> dict[str, Any]:
    """Tiles nearest any accepted region of ``label``, none inside a labelled box."""
    with book._lock:  # one view of the regions for the query and the boxes left out
        accepted, rejected = list(book.accepted), list(book.rejected)
    queries = _queries(service, [r for r in accepted if r[5] == label])
    if not queries:
        raise ConfigError(f"no accepted region has label {label!r}; accept a hit first")
    first = queries[0]  # the tile vectors of every accepted region, as one query
    query = dataclasses.replace(
        first,
        vectors=np.concatenate([q.vectors for q in queries]),
        tile_coords=np.concatenate([q.tile_coords for q in queries]),
        tile_numbers=None,
        slide_number=None,
    )
    labelled: dict[str, list[Record]] = {}
    for record in accepted + rejected:
        labelled.setdefault(record[0], []).append(record)
    fetch = min(k + 4 * sum(map(len, labelled.values())), MAX_MORE_FETCH)
    while True:  # fetch more until k lie outside the labelled boxes (or the index runs out)
        out = service.run(service.index, query, k=fetch, mode="tiles")
        keep = [h for h in out["hits"] if not _in_any(service, h, labelled)][:k]
        if len(keep) == k or len(out["hits"]) < fetch or fetch >= MAX_MORE_FETCH:
            break
        fetch = min(2 * fetch, MAX_MORE_FETCH)
    out["query"]["regions"] = len(queries)
    out["k"] = k  # what was asked for; hits_per_tile says how many neighbours were fetched
    for rank, hit in enumerate(keep, 1):
        hit["rank"] = rank
    out["hits"] = keep
    return out


def _in_any(service: SlideService, hit: dict[str, Any], by_slide: dict[str, list[Record]]) -> bool:
    """Whether ``hit`` lies in a labelled box of its slide (``by_slide``: records by slide)."""
    records = by_slide.get(hit["slide_id"], [])
    if not records:
        return False
    w, h = service.index.resolve_slide(hit["slide_id"])["dimensions"]
    return any(_inside(hit, r, (int(w), int(h))) for r in records)


def _queries(service: SlideService, records: list[Record]) -> list[Query]:
    """The region queries of ``records`` (a region without a stored tile's centre is skipped)."""
    out = []
    for slide, x, y, w, h, _ in records:
        with contextlib.suppress(NoTilesInRegionError, RegionOutsideSlideError):
            out.append(service.region_query(slide, (x, y, w, h)))
    return out


def _vectors(service: SlideService, records: list[Record]) -> np.ndarray:
    """The stored tile vectors of ``records``' regions, (N, D)."""
    return np.concatenate([q.vectors for q in _queries(service, records)] or [np.zeros((0, 1))])


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def concept_map(service: SlideService, book: LabelBook, slide: str, label: str) -> bytes:
    """PNG (RGBA, thumbnail size) of ``label``'s concept over ``slide``: see the module doc."""
    from PIL import Image, ImageDraw

    from wsi_ssl.serve.pyramid import encode

    with book._lock:  # one view of the regions for the vectors and the scale's key
        regions = (
            tuple(r for r in book.accepted if r[5] == label),
            tuple(r for r in book.rejected if r[5] == label),
        )
    accepted = _vectors(service, list(regions[0]))
    if not len(accepted):
        raise ConfigError(f"no accepted region has label {label!r}; accept a hit first")
    rejected = _vectors(service, list(regions[1]))
    store = service.store(slide)
    embeddings = service.archive.embeddings(store.slide_id, service.index.encoder_id)
    embeddings = embeddings.embedded_only()  # tiles left out by QC at embed: not drawn
    score = _scores(np.asarray(embeddings.features), accepted, rejected)
    lo, hi = _archive_scale(service, book, label, regions, (accepted, rejected))
    strength = np.clip((score - lo) / (hi - lo), 0.0, 1.0)
    h, w = store.thumbnail.shape[:2]
    image = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    f = w / float(store.source["dimensions"][0])
    side = float(store.tiling["tile_size_level0"]) * f
    for (x, y), a in zip(embeddings.coords, strength, strict=True):
        box = [x * f, y * f, x * f + side - 1, y * f + side - 1]
        draw.rectangle(box, fill=(230, 40, 20, round(200 * float(a))))
    return encode(image, "png")


def _scores(features: np.ndarray, accepted: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """Each tile's best cosine similarity to ``accepted`` minus its best to ``rejected``."""
    feats = _unit(features)
    score = (feats @ _unit(accepted).T).max(axis=1)
    if len(rejected):
        score = score - (feats @ _unit(rejected).T).max(axis=1)
    return score


def _archive_scale(
    service: SlideService,
    book: LabelBook,
    label: str,
    regions: tuple[tuple[Record, ...], tuple[Record, ...]],
    vectors: tuple[np.ndarray, np.ndarray],
) -> tuple[float, float]:
    """(median, 99th percentile) of the scores of a sample of the index's tiles (evenly
    spread over at most ``SCALE_SLIDES`` slides, ``SCALE_SAMPLE`` tiles) against the
    ``vectors`` (accepted, rejected) of the label's ``regions``, kept until those regions or
    the index change."""
    index = service.index
    key = (index.name, index.n_vectors, *regions)
    accepted, rejected = vectors
    kept = book.scales.get(label)
    if kept is not None and kept[0] == key:
        return kept[1]
    slide_ids = list(dict.fromkeys(e.slide_id for e in index.entries if e.active))
    if len(slide_ids) > SCALE_SLIDES:
        slide_ids = [
            slide_ids[i] for i in np.linspace(0, len(slide_ids) - 1, SCALE_SLIDES).astype(int)
        ]
    per_slide = max(1, SCALE_SAMPLE // max(1, len(slide_ids)))
    sample = []
    for slide_id in slide_ids:
        try:  # a slide being re-tiled or re-embedded is left out of the sample
            emb = service.archive.embeddings(slide_id, index.encoder_id, lazy=True)
            emb = emb.embedded_only()
            if len(emb.features):
                rows = np.unique(np.linspace(0, len(emb.features) - 1, per_slide).astype(int))
                sample.append(np.asarray(emb.features[rows], dtype=np.float32))
        except (WsiSslError, OSError, KeyError, ValueError):
            continue
    if sample:
        scores = _scores(np.concatenate(sample), accepted, rejected)
        lo, hi = (float(v) for v in np.percentile(scores, [50, 99]))
    else:  # nothing to measure on: the raw score, 0 (no likeness) to 1
        lo, hi = 0.0, 1.0
    book.scales[label] = (key, (lo, max(hi, lo + 1e-6)))
    return book.scales[label][1]


def _inside(hit: dict[str, Any], record: Record, dimensions: tuple[int, int]) -> bool:
    """Whether the centre of the hit tile's part on the slide lies in ``record``'s box (as a
    region query picks its tiles)."""
    slide, x, y, w, h, _ = record
    tx, ty, size, _ = hit["tile_box"]
    (cx,), (cy,) = on_slide_centres(np.array([[tx, ty]]), size, dimensions)
    return bool(hit["slide_id"] == slide and x <= cx < x + w and y <= cy < y + h)


def add_label_routes(app: FastAPI, service: SlideService, pool: RenderPool) -> None:
    """Register the label routes of the module docstring on ``app``."""
    book = LabelBook(service.index.root)

    @app.get("/api/slides/{slide}/concept.png")
    async def concept(
        slide: str, label: str = QueryParam("positive", pattern=LABEL_PATTERN)
    ) -> Response:
        data = await pool.run(concept_map, service, book, slide, label)
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.get("/api/labels")
    def labels() -> dict[str, Any]:
        return book.to_dict()

    @app.post("/api/labels")
    def set_label(request: LabelRequest) -> dict[str, Any]:
        entry = service.index.resolve_slide(request.slide)
        _, _, w, h = request.box
        if w <= 0 or h <= 0 or max(abs(v) for v in request.box) >= 2**31:
            raise ConfigError(
                f"box {list(request.box)} must have width and height > 0, each value within ±2**31"
            )
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
        return more_like(service, book, request.label, request.k)
