"""Query builders: a tile, a region, a whole slide (its mosaic) or an image -> :class:`Query`.

A query slide need not be in the index, only in its archive, tiled at the index's scale; its
vectors are read from the slide store. Image queries are embedded with the index's encoder.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl.errors import (
    ConfigError,
    NoTilesInRegionError,
    RegionOutsideSlideError,
    TilingMismatchError,
    UnknownSlideError,
)
from wsi_ssl.search.archive import catalog_names, same_grid, tiling_key
from wsi_ssl.search.results import Query
from wsi_ssl.search.vectors import normalise
from wsi_ssl.stain_settings import stain_text

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from wsi_ssl.encoders import Encoder
    from wsi_ssl.search.searching import Searchable
    from wsi_ssl.storage import SlideStore

__all__ = [
    "MAX_QUERY_TILES",
    "MOSAIC_TILES",
    "centres_in",
    "image_query",
    "mosaic_rows",
    "region_query",
    "slide_query",
    "subsample",
    "tile_query",
]

MAX_QUERY_TILES = 1024
"""A region or image query with more tiles is searched with this many, evenly subsampled."""
MOSAIC_TILES = 64
"""Tiles representing a whole slide in slide-level queries (k-means medoids of its vectors)."""


class _QuerySlide:
    """A query slide's store, its number in the index (None: not indexed), name and vectors."""

    def __init__(self, index: Searchable, slide: str) -> None:
        from wsi_ssl.storage import open_store
        from wsi_ssl.storage.resolve import resolve_slide

        archive = open_store(index.root)
        try:
            sid = index.resolve_slide(slide).slide_id
        except UnknownSlideError:
            sid = resolve_slide(archive, slide)  # a slide of the archive the index does not hold
        self.store: SlideStore = archive.slide(sid)
        self.number = index.number_of(sid)
        if self.number is not None:
            self.name = index.entries[self.number].name
        else:
            fallback = self.store.source_name or sid
            self.name = catalog_names(archive).get(sid, (fallback, ""))[0]
        key = tiling_key(self.store.tiling)
        if not same_grid(index.tiling, key):
            raise TilingMismatchError(
                f"{self.store.path}: tiled at {key['mpp']} µm/px, {key['tile_size']} px, the index "
                f"{index.name!r} at {index.mpp} µm/px, {index.tiling['tile_size']} px; query with "
                "a slide tiled like the index"
                + ("" if self.number is None else " (this one was re-tiled after indexing)")
            )
        self.size = float(self.store.tiling["tile_size_level0"])
        self.mpp = float(self.store.source["mpp"])
        self.encoder_id = index.encoder_id

    def vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(vectors, coords, tile numbers) of the tiles that hold vectors (not those an
        embedding job with ``skip_flagged_tiles`` left out)."""
        from wsi_ssl.storage.embeddings import read_embeddings

        emb = read_embeddings(self.store, self.encoder_id).embedded_only()
        features = np.asarray(emb.features, dtype=np.float32)
        return features, np.asarray(emb.coords), emb.tile_ids

    def left_out_in(self, box: Sequence[float]) -> int:
        """How many of the tiles centred in level-0 ``box`` hold no vector: QC flagged them and
        an embedding job with ``skip_flagged_tiles`` left them out (attributes and coords
        read, no vectors)."""
        from wsi_ssl.storage.embedding_rows import not_embedded_tiles
        from wsi_ssl.storage.embeddings import read_embeddings

        emb = read_embeddings(self.store, self.encoder_id, lazy=True)
        left_out = not_embedded_tiles(emb.attrs)
        if not len(left_out):
            return 0
        dimensions = self.store.source["dimensions"]
        rows = centres_in(np.asarray(emb.coords), self.size, dimensions, box)
        return int(np.isin(rows, left_out).sum())


def clip_box(box: Sequence[int], dimensions: Sequence[int]) -> tuple[int, int, int, int] | None:
    """``box`` (x, y, w, h) cut to a slide of ``dimensions`` (None: it misses the slide)."""
    x, y, w, h = (int(v) for v in box)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, int(dimensions[0])), min(y + h, int(dimensions[1]))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


def on_slide_centres(
    coords: np.ndarray, size: float, dimensions: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) centres of the parts on the slide of tiles at level-0 ``coords`` (N, 2) of edge
    ``size``: a tile over the slide's edge is placed by what of it lies on the slide."""
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    cx = (np.maximum(xy[:, 0], 0) + np.minimum(xy[:, 0] + size, dimensions[0])) / 2
    cy = (np.maximum(xy[:, 1], 0) + np.minimum(xy[:, 1] + size, dimensions[1])) / 2
    return cx, cy


def centres_in(
    coords: np.ndarray, size: float, dimensions: Sequence[int], box: Sequence[float]
) -> np.ndarray:
    """Rows of the tiles at ``coords`` whose :func:`on_slide_centres` lie in level-0 ``box``
    (x, y, w, h): the tiles a region query takes."""
    x, y, w, h = box
    cx, cy = on_slide_centres(coords, size, dimensions)
    return np.flatnonzero((cx >= x) & (cx < x + w) & (cy >= y) & (cy < y + h))


def subsample(rows: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` of ``rows``, evenly spread."""
    if len(rows) <= limit:
        return rows
    return rows[np.linspace(0, len(rows) - 1, limit).round().astype(np.int64)]


def tile_query(
    index: Searchable,
    slide: str,
    xy: tuple[int, int],
    within: tuple[int, int, int, int] | None = None,
) -> Query:
    """The stored tile of ``slide`` that contains level-0 point ``xy``: the tile whose top-left
    corner it is (its ``coords`` row), else, of several overlapping tiles, the one whose part on
    the slide is centred nearest it. (At a fractional tile size, 256.5 level-0 px say, a
    tile's rounded corner also lies inside the tile before it, whose centre is nearer.) With
    none there (glass, or a tile QC left out) and a box ``within``, the tile centred nearest
    ``xy`` of those centred in it (a box drawn around a gap in the tissue)."""
    q = _QuerySlide(index, slide)
    x, y = (int(v) for v in xy)
    w, h = q.store.source["dimensions"]
    if not (0 <= x < w and 0 <= y < h):
        raise RegionOutsideSlideError(
            f"{q.name}: point {x},{y} is outside the slide (0..{w - 1}, 0..{h - 1} level-0 px)"
        )
    feats, coords, tiles = q.vectors()
    size = q.size
    inside = (
        (coords[:, 0] <= x)
        & (x < coords[:, 0] + size)
        & (coords[:, 1] <= y)
        & (y < coords[:, 1] + size)
    )
    rows = np.flatnonzero(inside)
    if not len(rows) and within is not None:
        rows = centres_in(coords, size, (w, h), within)
    if not len(rows):
        where = "contains point" if within is None else "is centred in the box about point"
        raise NoTilesInRegionError(
            f"{q.name}: no stored tissue tile {where} {x},{y} (or its tile "
            f"was left out by QC); pick a point on tissue (tiles cover {len(coords)} positions)"
        )
    corner = rows[(coords[rows, 0] == x) & (coords[rows, 1] == y)]
    cx, cy = on_slide_centres(coords[rows], size, (w, h))
    row = corner[0] if len(corner) else rows[int(np.argmin((cx - x) ** 2 + (cy - y) ** 2))]
    side_um = size * q.mpp
    tx, ty = (int(v) for v in coords[row])
    box = (tx, ty, round(size), round(size))
    return Query(
        "tile",
        feats[[row]],
        q.store.slide_id,
        q.name,
        box,
        coords[[row]],
        tiles[[row]],
        size,
        (side_um, side_um),
        slide_number=q.number,
    )


def region_query(index: Searchable, slide: str, box: tuple[int, int, int, int]) -> Query:
    """The stored tiles of ``slide`` whose centres lie in level-0 ``box`` (clipped to it)."""
    q = _QuerySlide(index, slide)
    sid, name = q.store.slide_id, q.name  # messages name it as its user knows it: by file
    x, y, w, h = (int(v) for v in box)
    sw, sh = q.store.source["dimensions"]
    if w <= 0 or h <= 0:
        raise RegionOutsideSlideError(
            f"{name}: box {x},{y},{w},{h} has no area; width and height must be > 0"
        )
    clipped = clip_box((x, y, w, h), (sw, sh))
    if clipped is None:
        raise RegionOutsideSlideError(
            f"{name}: box {x},{y},{w},{h} lies outside the slide, which is {sw}x{sh} "
            "level-0 px; give X,Y,W,H in level-0 pixels"
        )
    x0, y0 = clipped[:2]
    x1, y1 = x0 + clipped[2], y0 + clipped[3]
    feats, coords, tiles = q.vectors()
    rows = centres_in(coords, q.size, (sw, sh), clipped)
    if not len(rows):
        drawn = f"{name}: box {x0},{y0},{x1 - x0},{y1 - y0}"
        if left_out := q.left_out_in(clipped):
            raise NoTilesInRegionError(
                f"{drawn} holds no tile with a vector: QC flagged its {left_out} stored tile(s) "
                "and the embedding left them out (flagged tiles skipped); draw the box over "
                "tiles QC kept, or embed the slide again without skipping flagged tiles"
            )
        raise NoTilesInRegionError(
            f"{drawn} holds no stored tissue tile (tiles are {round(q.size)} level-0 px; a tile "
            "counts when the centre of its part on the slide is inside); draw the box over "
            "tissue or make it larger"
        )
    in_box, rows = len(rows), subsample(rows, MAX_QUERY_TILES)
    return Query(
        "region",
        feats[rows],
        sid,
        q.name,
        (x0, y0, x1 - x0, y1 - y0),
        coords[rows],
        tiles[rows],
        q.size,
        ((x1 - x0) * q.mpp, (y1 - y0) * q.mpp),
        slide_number=q.number,
        tiles_in_box=in_box,
    )


def slide_query(
    index: Searchable, slide: str, max_tiles: int = MOSAIC_TILES, seed: int = 0
) -> Query:
    """A whole slide as a mosaic of up to ``max_tiles`` tiles (see :func:`mosaic_rows`)."""
    q = _QuerySlide(index, slide)
    feats, coords, tiles = q.vectors()
    if not len(feats):
        raise NoTilesInRegionError(f"{q.name}: the slide has no stored tiles")
    rows = mosaic_rows(feats, max_tiles, seed)
    w, h = q.store.source["dimensions"]
    return Query(
        "slide",
        feats[rows],
        q.store.slide_id,
        q.name,
        (0, 0, int(w), int(h)),
        coords[rows],
        tiles[rows],
        q.size,
        (w * q.mpp, h * q.mpp),  # the query box, the whole slide
        slide_number=q.number,
    )


def mosaic_rows(feats: np.ndarray, max_tiles: int, seed: int = 0) -> np.ndarray:
    """Rows of the tiles nearest each of ``max_tiles`` k-means centroids (all rows if fewer):
    cf. Yottixel's mosaic, Kalra et al. 2020."""
    n = len(feats)
    if n <= max_tiles:
        return np.arange(n)
    import faiss

    x = normalise(feats)
    km = faiss.Kmeans(
        x.shape[1], max_tiles, niter=10, seed=seed, verbose=False, min_points_per_centroid=1
    )
    km.train(x)
    assert km.centroids is not None  # set by train()
    flat = faiss.IndexFlatL2(x.shape[1])
    flat.add(x)
    _, nearest = flat.search(km.centroids, 1)
    return np.unique(nearest.ravel())


def _image_pixels(image: str | Path | np.ndarray, limit: int) -> np.ndarray:
    from wsi_ssl.search.image import load_image

    if isinstance(image, str | Path):
        return load_image(image, max_pixels=limit)
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ConfigError(f"query image must be uint8 (h, w, 3), got {pixels.dtype} {pixels.shape}")
    return pixels[..., :3]


def image_query(
    index: Searchable,
    image: str | Path | np.ndarray,
    *,
    image_mpp: float | None = None,
    encoder: Encoder | str | Path | None = None,
    weights: str | Path | None = None,
    max_pixels: int | None = None,
) -> Query:
    """An image rescaled from ``image_mpp`` (default: the index's) to the index's mpp, cut
    into the index's tiles (edges padded white, blank tiles dropped), stain-normalised as the
    index's slides were (the reference their embeddings recorded) and embedded."""
    from wsi_ssl.search.encoder import index_encoder
    from wsi_ssl.search.image import MAX_IMAGE_PIXELS, cut_tiles, rescale

    limit = max_pixels or MAX_IMAGE_PIXELS
    pixels = _image_pixels(image, limit)
    src_mpp = float(image_mpp) if image_mpp is not None else index.mpp
    pixels = rescale(pixels, src_mpp, index.mpp, max_pixels=limit)
    t = index.tiling
    stride = t["tile_size"] - t["overlap"]
    tiles, coords, _ = cut_tiles(
        pixels, t["tile_size"], stride, mpp=index.mpp, tissue_threshold=t["tissue_threshold"]
    )
    in_box, rows = len(tiles), subsample(np.arange(len(tiles)), MAX_QUERY_TILES)
    tiles, coords = tiles[rows], coords[rows]
    stain = _index_stain(index)
    if stain and len(tiles):  # as the indexed tiles were
        tiles = _normalised(tiles, stain, index.name)
    enc = index_encoder(
        index.encoder_id, index.record.get("encoder", {}), encoder=encoder, weights=weights
    )
    vectors = enc.embed_images(tiles)
    h, w = pixels.shape[:2]
    return Query(
        "image",
        vectors.astype(np.float32),
        None,
        None,
        (0, 0, w, h),
        coords,
        None,
        float(t["tile_size"]),
        (w * index.mpp, h * index.mpp),
        image=pixels,
        stain=stain_text(stain) if stain else None,
        tiles_in_box=in_box,
    )


def _index_stain(index: Searchable) -> dict[str, Any] | None:
    """The stain normalisation a picture query needs: the index's slides' (read from them for
    an index from before its record kept it); None, with a warning, when they recorded no
    reference path (embedded before it was recorded: the picture is embedded as it is)."""
    from wsi_ssl.search.archive import indexed_stain
    from wsi_ssl.storage import open_store

    active = [e for e in index.entries if e.active]
    stain = indexed_stain(index.record, open_store(index.root), active, index.encoder_id)
    if not isinstance(stain, dict):
        return None
    if not stain.get("reference_path"):
        log.warning(
            "index %s: its slides were stain-normalised (%s) but recorded no reference path; "
            "the picture is embedded without normalisation (re-embed with --no-resume to fix)",
            index.name,
            stain.get("method"),
        )
        return None
    return stain


def _normalised(tiles: np.ndarray, stain: dict[str, Any], index_name: str) -> np.ndarray:
    """uint8 tiles (N, T, T, 3) stain-normalised as the index's slides were embedded.

    Raises:
        StainReferenceError: the reference image is gone or changed since.
    """
    import torch

    from wsi_ssl.errors import StainReferenceError
    from wsi_ssl.stain_settings import recorded_reference

    what = f"index {index_name}'s slides were embedded from tiles"
    try:
        reference = recorded_reference(stain, what)
    except StainReferenceError as err:
        raise StainReferenceError(
            f"{err}; a picture query is normalised with that image: put it back"
        ) from None
    normalizer = _normalizer(stain["method"], str(reference), stain["reference_sha256"])
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2)
    return normalizer(x).permute(0, 2, 3, 1).contiguous().numpy()


@functools.lru_cache(maxsize=4)
def _normalizer(method: str, reference: str, sha256: str) -> Any:
    """The normaliser fitted to ``reference`` of content ``sha256`` (hashed and fitted from
    the same bytes), once per process, not per query.

    Raises:
        StainReferenceError: the file is not that content (it changed since it was checked).
    """
    import hashlib
    import io

    from PIL import Image

    from wsi_ssl.errors import StainReferenceError
    from wsi_ssl.stain import StainNormalizer

    data = Path(reference).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StainReferenceError(f"{reference}: changed while it was read; try again")
    with Image.open(io.BytesIO(data)) as image:
        return StainNormalizer(method, np.asarray(image.convert("RGB")))
