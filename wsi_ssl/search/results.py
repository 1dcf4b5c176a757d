"""Queries and their results: what a search was asked and what it returned, as table or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from wsi_ssl.search.vectors import normalise

__all__ = ["Query", "RegionHit", "SearchResult", "SlideHit", "TileHit"]


@dataclass
class Query:
    """A set of query tile vectors and where they came from.

    Attributes:
        kind: "tile", "region", "image" or "slide" (a whole slide's mosaic).
        vectors: float32 (Q, D) unit vectors.
        slide_id: the query slide (None for an image).
        slide_name: its file name.
        box: level-0 (x, y, w, h) on the query slide; for an image, (0, 0, w, h) in pixels
            at the index's mpp.
        tile_coords: (Q, 2) top-left of each query tile: level-0 on the slide, pixels at the
            index mpp on an image.
        tile_numbers: rows of the query slide's tiles (None for an image).
        tile_size: a tile's edge in the units of ``tile_coords``.
        size_um: physical (width, height) of the query box in µm.
        image: the query image rescaled to the index mpp (image queries; for the gallery).
        slide_number: the query slide's number in the index (None if not indexed).
        stain: how an image query's tiles were stain-normalised, as the index's slides were
            ("reinhard to ref.png"; None: not).
        tiles_in_box: the tiles a region or image holds (None: as many as ``vectors``); a query
            takes an even sample of ``MAX_QUERY_TILES`` of more.
    """

    kind: str
    vectors: np.ndarray
    slide_id: str | None
    slide_name: str | None
    box: tuple[int, int, int, int]
    tile_coords: np.ndarray
    tile_numbers: np.ndarray | None
    tile_size: float
    size_um: tuple[float, float]
    image: np.ndarray | None = None
    slide_number: int | None = None
    stain: str | None = None
    tiles_in_box: int | None = None

    def __post_init__(self) -> None:
        self.vectors = normalise(self.vectors)

    @property
    def n_tiles(self) -> int:
        return len(self.vectors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "slide_id": self.slide_id,
            "slide_name": self.slide_name,
            "box": list(self.box),
            "n_tiles": self.n_tiles,
            "size_um": [round(v, 2) for v in self.size_um],
            "stain": self.stain,
            "tiles_in_box": self.tiles_in_box if self.tiles_in_box is not None else self.n_tiles,
        }


@dataclass
class TileHit:
    """One retrieved tile: level-0 top-left (x, y) and edge ``size`` on its slide, in whole
    level-0 pixels. ``size`` is the tile's level-0 edge (``SlideEntry.tile_size_level0``: the
    tile size times the tiling's µm/px over the slide's, often a fraction, e.g. 448.9) rounded,
    so within half a pixel of the tile's extent; the boxes made of it (the web page's, which it
    posts back as labels) are whole pixels, as the label API and label files take them."""

    rank: int
    slide_id: str
    name: str
    tile: int
    x: int
    y: int
    size: int
    score: float


@dataclass
class RegionHit:
    """One retrieved region: level-0 ``box`` (x, y, w, h), the scored window of whole grid
    cells (the query box's size rounded to cells, cut at the slide's edge); ``score`` = the
    sum over the query tiles of each one's best similarity to a tile in the region (at most
    the number of query tiles; :mod:`wsi_ssl.search.regions`); ``mean_similarity`` = score /
    query tiles; ``n_tiles`` the region's tiles that matched; ``coverage`` = fraction of query
    tiles with a neighbour in it."""

    rank: int
    slide_id: str
    name: str
    box: tuple[int, int, int, int]
    score: float
    n_tiles: int
    mean_similarity: float
    coverage: float
    tiles: list[int] = field(default_factory=list, repr=False)


@dataclass
class SlideHit:
    """One retrieved slide: ``score`` = mean over query tiles of their best similarity on it."""

    rank: int
    slide_id: str
    name: str
    score: float
    coverage: float
    n_hits: int
    best_box: tuple[int, int, int, int] | None


@dataclass
class SearchResult:
    """The answer to a query: ``hits`` are TileHit, RegionHit or SlideHit by ``mode``."""

    query: Query
    mode: str
    k: int
    exclude_self: bool
    index: dict[str, Any]
    hits: list[Any]
    hits_per_tile: int
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        hits = []
        for h in self.hits:
            d = asdict(h)
            for key in ("box", "best_box"):
                if d.get(key) is not None:
                    d[key] = [int(v) for v in d[key]]
            if "score" in d:
                d["score"] = round(float(d["score"]), 5)
            for key in ("mean_similarity", "coverage"):
                if key in d:
                    d[key] = round(float(d[key]), 4)
            hits.append(d)
        return {
            "query": self.query.to_dict(),
            "mode": self.mode,
            "k": self.k,
            "exclude_self": self.exclude_self,
            "hits_per_tile": self.hits_per_tile,
            "index": self.index,
            "seconds": round(self.seconds, 4),
            "hits": hits,
        }

    def table(self) -> str:
        """A readable table, one line per hit."""
        q = self.query
        where = (
            f"{q.slide_name or q.slide_id} box {','.join(map(str, q.box))}"
            if q.slide_id
            else (f"image {q.box[2]}x{q.box[3]} px at the index mpp")
        )
        if q.stain:
            where += f", stain-normalised ({q.stain}) as the index's slides"
        count = f"{q.n_tiles} tile{'s' if q.n_tiles != 1 else ''}"
        if q.tiles_in_box is not None and q.tiles_in_box > q.n_tiles:
            count += f", an even sample of the {q.tiles_in_box} it holds"
        head = (
            f"{q.kind} query: {where} ({count}); "
            f"index {self.index.get('name')} ({self.index.get('kind')}, "
            f"{self.index.get('n_vectors')} vectors); {self.seconds * 1e3:.1f} ms"
        )
        lines = [head]
        if not self.hits:
            lines.append("no hits")
            return "\n".join(lines)
        if self.mode == "tiles":
            lines.append(f"{'rank':>4}  {'score':>7}  {'x':>7}  {'y':>7}  {'size':>5}  slide")
            lines += [
                f"{h.rank:>4}  {h.score:7.4f}  {h.x:>7}  {h.y:>7}  {h.size:>5}  {h.name} ({h.slide_id})"
                for h in self.hits
            ]
        elif self.mode == "regions":
            lines.append(
                f"{'rank':>4}  {'score':>8}  {'tiles':>5}  {'mean':>6}  {'cover':>5}  "
                f"{'box x,y,w,h (level 0)':<26} slide"
            )
            lines += [
                f"{h.rank:>4}  {h.score:8.3f}  {h.n_tiles:>5}  {h.mean_similarity:6.3f}  "
                f"{h.coverage:5.0%}  {','.join(map(str, h.box)):<26} {h.name} ({h.slide_id})"
                for h in self.hits
            ]
        else:
            lines.append(f"{'rank':>4}  {'score':>7}  {'cover':>5}  {'hits':>5}  slide")
            lines += [
                f"{h.rank:>4}  {h.score:7.4f}  {h.coverage:5.0%}  {h.n_hits:>5}  {h.name} ({h.slide_id})"
                for h in self.hits
            ]
        return "\n".join(lines)
