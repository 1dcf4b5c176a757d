"""Tile quality control: per-tile scores computed while tiles are written, and the tiles
that pass.

Scores (``qc/<metric>`` in the store, float32, one per tile):

- ``focus``: variance of the Laplacian (Pech-Pacheco et al., 2000) of the green channel,
  on every second pixel, in 8-bit levels squared; blur and blank glass score low.
- ``pen``: fraction of pixels that are marker ink (the hue rules of :mod:`wsi_ssl.tissue`).
- ``tissue``: fraction of pixels that are stained tissue (optical density above glass, not
  ink, not dark grey).
- ``dark``: fraction of very dark pixels (mean RGB below ``DARK_LEVEL``): folds, bubbles'
  rims, dirt, scanner borders.

A tile is *flagged* when a score is past its ``TilingConfig`` threshold (``qc_min_focus``,
``qc_max_pen``, ``qc_min_tissue``, ``qc_max_dark``). Flagged tiles stay in the store;
:func:`qc_pass` gives the mask consumers use to skip them, and :func:`kept_tiles` applies other
thresholds to a store. ``wsi-ssl tile`` re-run with new thresholds writes them into the store
without re-tiling (:mod:`wsi_ssl.tiling.resume`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsi_ssl.errors import ConfigError
from wsi_ssl.tissue import colour_cells, colour_rules, coverage_overlay

if TYPE_CHECKING:
    from wsi_ssl.storage import SlideStore

__all__ = [
    "DARK_LEVEL",
    "QC_METRICS",
    "chunk_scores",
    "kept_tiles",
    "qc_overlay",
    "qc_pass",
    "save_overlays",
    "tile_scores",
    "tissue_overlay",
]

QC_METRICS = ("focus", "pen", "tissue", "dark")
DARK_LEVEL = 60
"""Mean RGB below which a pixel is very dark (H&E nuclei stay above it)."""
TISSUE_OD = 0.2
"""Summed optical density (over R, G, B, against white) above which a pixel is stained:
clean glass is about 0.06 at 243 grey, faint eosin 0.3 and more."""

_OD = -np.log10(np.maximum(np.arange(256), 1) / 255.0)
_INK, _DARK_GREY, _STAINED, _VERY_DARK = 1, 2, 4, 8


@functools.lru_cache(maxsize=1)
def _codes() -> np.ndarray:
    """uint8 bit flags of every RGB cell of :func:`colour_cells`, judged at its centre."""
    ink, dark_grey = colour_rules()
    centre = (np.arange(32) << 3) + 3.5
    r, g, b = (c.ravel() for c in np.meshgrid(centre, centre, centre, indexing="ij"))
    od = _OD[r.astype(np.int64)] + _OD[g.astype(np.int64)] + _OD[b.astype(np.int64)]
    codes = np.where(ink, _INK, 0) | np.where(dark_grey, _DARK_GREY, 0)
    codes |= np.where(od > TISSUE_OD, _STAINED, 0)
    codes |= np.where((r + g + b) / 3 < DARK_LEVEL, _VERY_DARK, 0)
    return codes.astype(np.uint8)


def tile_scores(tiles: np.ndarray | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The QC scores of uint8 RGB tiles (T, T, 3), as float32 (k,) per metric.

    Focus is taken on every second pixel of every second row (the Laplacian of the
    subsampled green channel still separates sharp from blurred detail), colour fractions on
    every fourth (4,096 samples of a 256 px tile), per RGB cell of 5 bits a channel. Tiles of
    one size are scored together, as one (k, T, T, 3) array.
    """
    if not isinstance(tiles, np.ndarray):
        if len({tile.shape for tile in tiles}) > 1:
            parts = [tile_scores(tile[None]) for tile in tiles]
            return {m: np.concatenate([p[m] for p in parts]) for m in QC_METRICS}
        tiles = np.stack(tiles) if len(tiles) else np.zeros((0, 1, 1, 3), dtype=np.uint8)
    k = len(tiles)
    if not k:
        return {m: np.zeros(0, dtype=np.float32) for m in QC_METRICS}
    focus = laplacian_variance(tiles[:, ::2, ::2, 1])
    codes = np.take(_codes(), colour_cells(tiles[:, ::4, ::4]))
    codes = codes.reshape(k, -1) + (np.arange(k, dtype=np.int64) << 4)[:, None]
    counts = np.bincount(codes.ravel(), minlength=16 * k).reshape(k, 16)
    flags = np.arange(16)
    n = np.maximum(counts.sum(axis=1), 1)

    def share(rule: np.ndarray) -> np.ndarray:
        return (counts[:, rule].sum(axis=1) / n).astype(np.float32)

    stained = (flags & _STAINED > 0) & (flags & (_INK | _DARK_GREY) == 0)
    return {
        "focus": focus,
        "pen": share(flags & _INK > 0),
        "tissue": share(stained),
        "dark": share(flags & _VERY_DARK > 0),
    }


def laplacian_variance(grey: np.ndarray) -> np.ndarray:
    """float32 (k,): variance of the 4-neighbour Laplacian of the inner pixels of each of k
    uint8 images (k, H, W).

    Exact: the Laplacian in int16 (|L| <= 1020), its sum and sum of squares in int64, one
    float64 division at the end."""
    g = grey.astype(np.int16)
    lap = g[:, 1:-1, 1:-1] * np.int16(4)
    lap -= g[:, :-2, 1:-1]
    lap -= g[:, 2:, 1:-1]
    lap -= g[:, 1:-1, :-2]
    lap -= g[:, 1:-1, 2:]
    size = lap.shape[1] * lap.shape[2]
    if not size:
        return np.zeros(len(grey), dtype=np.float32)
    flat = lap.reshape(len(lap), size)
    total = flat.sum(axis=1, dtype=np.int64)
    wide = flat.astype(np.int32)
    squares = np.einsum("ij,ij->i", wide, wide, dtype=np.int64)
    mean = total / size
    return np.maximum(squares / size - mean * mean, 0.0).astype(np.float32)


_scratch = threading.local()


def chunk_scores(tiles: Sequence[np.ndarray | bytes], tile_size: int) -> dict[str, np.ndarray]:
    """The scores of one tiling task's tiles (T = ``tile_size``): arrays, or JPEG streams
    copied from the slide (decoded here, as the store will give them back).

    The tiles are gathered into one buffer per thread, reused from chunk to chunk: decoding
    into memory already mapped costs 0.26 ms a 256 px tile against 0.42 ms into a new array.
    """
    import imagecodecs

    batch = scratch_tiles(len(tiles), tile_size)
    for i, tile in enumerate(tiles):
        if isinstance(tile, bytes):
            imagecodecs.jpeg8_decode(tile, out=batch[i])
        elif tile.ctypes.data != batch[i].ctypes.data:  # not read into its place already
            batch[i] = tile
    return tile_scores(batch)


def scratch_tiles(n: int, tile_size: int) -> np.ndarray:
    """The calling thread's (n, T, T, 3) uint8 buffer, reused from chunk to chunk (a tiling
    task reads its tiles into it, :func:`chunk_scores` scores them there)."""
    shape = (tile_size, tile_size, 3)
    batch = getattr(_scratch, "batch", None)
    if batch is None or batch.shape[1:] != shape or len(batch) < n:
        batch = _scratch.batch = np.empty((n, *shape), dtype=np.uint8)
    return batch[:n]


def qc_pass(
    scores: Mapping[str, np.ndarray],
    *,
    min_focus: float = 0.0,
    max_pen: float = 1.0,
    min_tissue: float = 0.0,
    max_dark: float = 1.0,
) -> np.ndarray:
    """bool (N,): tiles whose scores are within every threshold (all, without scores).

    A score missing from ``scores`` (a store tiled before QC) passes.
    """
    n = len(next(iter(scores.values()))) if scores else 0
    ok = np.ones(n, dtype=bool)
    limits = {"focus": (min_focus, np.inf), "pen": (-np.inf, max_pen)}
    limits |= {"tissue": (min_tissue, np.inf), "dark": (-np.inf, max_dark)}
    for metric, (low, high) in limits.items():
        if metric in scores:
            values = scores[metric]
            ok &= (values >= low) & (values <= high)
    return ok


def _require_store(store: object, caller: str) -> None:
    """ConfigError saying how to get a slide store when ``store`` is not one (a slide's name)."""
    from wsi_ssl.storage import SlideStore

    if not isinstance(store, SlideStore):
        raise ConfigError(
            f"{caller} takes a slide store, open_store(ROOT).slide(NAME), not "
            f"{type(store).__name__} {store!r}",
            parameters=("store",),
        )


def kept_tiles(store: SlideStore, **thresholds: float) -> np.ndarray:
    """bool (N,): the store's tiles that pass QC, by the thresholds it was tiled with
    (``qc_min_focus``, ``qc_max_pen``, ``qc_min_tissue``, ``qc_max_dark``) or those given.

    Embed, pretraining and MIL pass ``store.coords[kept_tiles(store)]``-style selections to
    skip flagged tiles; a store tiled before QC keeps every tile.
    """
    _require_store(store, "kept_tiles")
    tiling = store.tiling
    names = ("qc_min_focus", "qc_max_pen", "qc_min_tissue", "qc_max_dark")
    unknown = set(thresholds) - set(names)
    if unknown:
        raise ConfigError(f"unknown QC threshold {sorted(unknown)}; choose from {names}")
    limits = {n: thresholds.get(n, tiling.get(n)) for n in names}
    given = {n.removeprefix("qc_"): float(v) for n, v in limits.items() if v is not None}
    scores = store.qc()
    if not scores:
        return np.ones(store.n_tiles, dtype=bool)
    return qc_pass(scores, **given)


def _tile_boxes(store: SlideStore) -> tuple[np.ndarray, float]:
    """Each tile's box on the thumbnail grid: (N, 4) x0, y0, x1, y1, and the scale."""
    per_px = store.source["dimensions"][0] / store.thumbnail.shape[1]
    side = store.tiling["tile_size_level0"] / per_px
    xy = store.coords / per_px
    return np.concatenate([xy, xy + side], axis=1), per_px


def qc_overlay(store: SlideStore, **thresholds: float) -> np.ndarray:
    """The thumbnail with tiles that pass QC tinted blue and flagged tiles red. A store
    without QC scores (tiled with ``qc=False``, ``--no-qc``) has every tile blue, unjudged:
    the picture says so across its top.

    Returns:
        uint8 RGB at the thumbnail's size (enlarged to at least ``MIN_SIDE`` px).
    """
    ok = kept_tiles(store, **thresholds)
    image = _enlarged(store.thumbnail)
    zoom = image.shape[1] / store.thumbnail.shape[1]
    boxes, _ = _tile_boxes(store)
    out = image.astype(np.float32)
    for box, good in zip(np.round(boxes * zoom).astype(np.int64), ok, strict=True):
        x0, y0, x1, y1 = np.maximum(box, 0)
        tint = np.array([0, 90, 255] if good else [255, 0, 0], dtype=np.float32)
        out[y0:y1, x0:x1] += (0.2 if good else 0.45) * (tint - out[y0:y1, x0:x1])
    picture = out.round().astype(np.uint8)
    if not store.qc():
        how = "with --no-qc" if store.tiling.get("qc") is False else "before QC scores were kept"
        _caption(picture, f"QC not scored (tiled {how}): every tile is drawn blue, none judged")
    return picture


def tissue_overlay(store: SlideStore) -> np.ndarray:
    """The thumbnail with kept tiles tinted blue and tissue that no kept tile covers in red
    (what tiling dropped); for a slide tiled with a ROI, tissue outside the region greyed and
    the region outlined in yellow. When the ROI's file is gone or changed since, the picture
    says so across its top (its red then includes tissue outside the ROI). Enlarged to at
    least ``MIN_SIDE`` px."""
    _, per_px = _tile_boxes(store)
    region, lost = _roi_region(store, per_px)
    picture = coverage_overlay(
        store.thumbnail,
        store.tissue_mask,
        store.coords,
        store.tiling["tile_size_level0"],
        per_px,
        region=region,
    )
    picture = _enlarged(picture)
    if lost is not None:
        _caption(picture, f"ROI not drawn: {lost}; red includes tissue outside the ROI")
    return picture


def _roi_region(store: SlideStore, per_px: float) -> tuple[np.ndarray | None, str | None]:
    """The ROI the slide was tiled in, on the thumbnail grid (None without one), and why it
    cannot be drawn: its file gone, changed since or unreadable (None when it is drawn)."""
    import hashlib

    from wsi_ssl.annotations import rasterize, read_annotations, roi_region
    from wsi_ssl.errors import AnnotationError

    tiling = store.tiling
    if not tiling.get("roi"):
        return None, None
    path = Path(tiling["roi"])
    if not path.is_file():
        return None, f"{path} is gone"
    with path.open("rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != tiling.get("roi_sha256"):
            return None, f"{path} changed since tiling"
    try:
        annotations = read_annotations(path)
        rasters = rasterize(annotations, store.tissue_mask.shape, per_px)
        include, exclude = tiling.get("roi_include") or [], tiling.get("roi_exclude") or []
        return roi_region(rasters, include, exclude, path), None
    except AnnotationError as err:
        return None, str(err)


def _caption(picture: np.ndarray, text: str) -> None:
    """Write ``text`` in white on a black band across the top of ``picture`` (in place),
    wrapped to its width."""
    import textwrap

    from PIL import Image, ImageDraw

    lines = textwrap.wrap(text, max(picture.shape[1] // 6 - 1, 10))
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, picture.shape[1], 13 * len(lines) + 4), fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((3, 2 + 13 * i), line, fill=(255, 255, 255))
    picture[...] = np.asarray(image)


MIN_SIDE = 800
"""Pictures of small thumbnails are enlarged (nearest neighbour) to at least this side."""


def _enlarged(image: np.ndarray) -> np.ndarray:
    zoom = max(1, MIN_SIDE // max(image.shape[:2]))
    return image.repeat(zoom, axis=0).repeat(zoom, axis=1)


def save_overlays(store: SlideStore, folder: str | Path) -> tuple[Path, Path]:
    """Write ``<slide_id>_tissue.png`` and ``<slide_id>_qc.png`` into ``folder``."""
    from PIL import Image

    _require_store(store, "save_overlays")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tissue = folder / f"{store.slide_id}_tissue.png"
    qc = folder / f"{store.slide_id}_qc.png"
    Image.fromarray(tissue_overlay(store)).save(tissue)
    Image.fromarray(qc_overlay(store)).save(qc)
    return tissue, qc
