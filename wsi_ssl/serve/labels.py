"""The search → label loop: accept or reject hits, keep the accepted regions, ask for more.

Verdicts live under the archive root, each file written atomically on every change:

* ``labels/regions.csv``: the accepted regions, ``slide,x,y,w,h,label`` (slide id, level-0
  box), readable by ``wsi-ssl mil`` and ``wsi-ssl evaluate``;
* ``labels/rejected.csv``: the rejected ones, same columns;
* ``labels/geojson/<slide_id>.geojson``: each slide's accepted regions as QuPath annotations
  (a FeatureCollection of rectangles, ``classification.name`` = the label).

Routes: ``GET /api/labels``; ``POST /api/labels`` ``{slide, box, label, verdict}`` with
verdict ``accept``, ``reject`` or ``clear``; ``POST /api/labels/more`` ``{label, k}``: the
tiles nearest any accepted region of ``label``, outside every labelled box.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel, Field

from wsi_ssl.errors import ConfigError
from wsi_ssl.serve.service import MAX_K, SlideService, answer

__all__ = ["LabelBook", "add_label_routes"]

COLUMNS = ("slide", "x", "y", "w", "h", "label")
LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$"
MAX_REGIONS = 10_000
Record = tuple[str, int, int, int, int, str]


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

    def to_dict(self) -> dict[str, Any]:
        def rows(records: list[Record]) -> list[dict[str, Any]]:
            return [dict(zip(COLUMNS, r, strict=True)) for r in records]

        return {
            "accepted": rows(self.accepted),
            "rejected": rows(self.rejected),
            "files": {"csv": "labels/regions.csv", "geojson": "labels/geojson/"},
        }

    def set(self, record: Record, verdict: Literal["accept", "reject", "clear"], name: str) -> None:
        """Record ``verdict`` on the region of ``record`` (any earlier verdict on it replaced)."""
        with self._lock:
            key = record[:5]
            self.accepted = [r for r in self.accepted if r[:5] != key]
            self.rejected = [r for r in self.rejected if r[:5] != key]
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
    regions = [r for r in book.accepted if r[5] == label]
    if not regions:
        raise ConfigError(f"no accepted region has label {label!r}; accept a hit first")
    queries = [service.region_query(r[0], tuple(r[1:5])) for r in regions]  # type: ignore[arg-type]
    first = queries[0]
    query = dataclasses.replace(
        first,
        vectors=np.concatenate([q.vectors for q in queries]),
        tile_coords=np.concatenate([q.tile_coords for q in queries]),
        tile_numbers=None,
        slide_number=None,
    )
    labelled = book.accepted + book.rejected
    result = service.search_vectors(query, k + 4 * len(labelled))
    out = answer(result)
    out["query"]["regions"] = len(regions)
    keep = [h for h in out["hits"] if not any(_inside(h, r) for r in labelled)][:k]
    for rank, hit in enumerate(keep, 1):
        hit["rank"] = rank
    out["hits"] = keep
    return out


def _inside(hit: dict[str, Any], record: Record) -> bool:
    slide, x, y, w, h, _ = record
    tx, ty, size, _ = hit["tile_box"]
    cx, cy = tx + size / 2, ty + size / 2
    return bool(hit["slide_id"] == slide and x <= cx < x + w and y <= cy < y + h)


def add_label_routes(app: FastAPI, service: SlideService) -> None:
    """Register the label routes of the module docstring on ``app``."""
    book = LabelBook(service.index.root)

    @app.get("/api/labels")
    def labels() -> dict[str, Any]:
        return book.to_dict()

    @app.post("/api/labels")
    def set_label(request: LabelRequest) -> dict[str, Any]:
        entry = service.index.resolve_slide(request.slide)
        x, y, w, h = request.box
        if w <= 0 or h <= 0:
            raise ConfigError(f"box {list(request.box)} has no area; width and height must be > 0")
        record = (entry["slide_id"], x, y, w, h, request.label)
        book.set(record, request.verdict, entry["name"])
        return book.to_dict()

    @app.post("/api/labels/more")
    def more(request: MoreRequest) -> dict[str, Any]:
        return more_like(service, book, request.label, request.k)
