"""Test helper: a slide store that holds only a bag of embeddings (and optionally tiles).

For tests that compose bags in memory: the store is created through the storage API
(:meth:`SlideStore.create`, :class:`EmbeddingWriter`, :class:`Catalog`), so MIL training,
prediction and heatmaps read it like any other.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl.storage import STATUS_COMPLETE, Catalog, SlideStore
from wsi_ssl.storage.embeddings import EmbeddingWriter, coords_sha256

__all__ = ["write_bag_store"]


def _grid(n: int, tile_size: int) -> np.ndarray:
    """Tiles laid out row by row on a square grid."""
    side = max(1, math.ceil(math.sqrt(n)))
    i = np.arange(n)
    return np.stack([(i % side) * tile_size, (i // side) * tile_size], axis=1)


def _thumbnail(
    coords: np.ndarray, tile_size: int, scale: float, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    tw, th = max(1, round(width * scale)), max(1, round(height * scale))
    thumbnail = np.full((th, tw, 3), 240, dtype=np.uint8)
    mask = np.zeros((th, tw), dtype=bool)
    for x, y in coords:
        x0, y0 = int(x * scale), int(y * scale)
        x1 = max(x0 + 1, round((x + tile_size) * scale))
        y1 = max(y0 + 1, round((y + tile_size) * scale))
        thumbnail[y0:y1, x0:x1] = (220, 170, 200)
        mask[y0:y1, x0:x1] = True
    return thumbnail, mask


def write_bag_store(
    root: str | Path,
    slide_id: str,
    features: np.ndarray,
    *,
    encoder_id: str,
    coords: np.ndarray | None = None,
    tiles: np.ndarray | None = None,
    name: str | None = None,
    tile_size: int = 224,
    mpp: float = 0.5,
    thumbnail_scale: float = 1 / 16,
    dtype: str = "float16",
    encoder: dict[str, Any] | None = None,
    qc: dict[str, np.ndarray] | None = None,
    qc_thresholds: dict[str, float] | None = None,
) -> Path:
    """Write ``<root>/slides/<slide_id>.zarr`` holding ``features`` (N, D) as its bag (N may
    be 0); ``tiles``: uint8 (N, T, T, 3) pixels (else the tiles array is left unwritten);
    ``name``: a file name recorded in ``catalog.sqlite``; ``qc``: per-tile QC scores
    (``{"pen": (N,), ...}``) stored as ``qc/<metric>``, judged by ``qc_thresholds``
    (``{"qc_max_pen": 0.5}``, recorded as tiling settings). Returns the store's path.

    Size: every part of a store written in order through the storage API, as tiling would."""
    features = np.asarray(features)
    n, dim = features.shape
    coords = np.asarray(_grid(n, tile_size) if coords is None else coords, dtype=np.int64)
    coords = coords.reshape(n, 2)
    width = int(coords[:, 0].max() + tile_size) if n else tile_size
    height = int(coords[:, 1].max() + tile_size) if n else tile_size
    thumbnail, mask = _thumbnail(coords, tile_size, thumbnail_scale, width, height)
    source: dict[str, Any] = {
        "path": name or f"{slide_id}.bag",
        "fingerprint": slide_id,
        "reader": "bag",
        "vendor": "none",
        "dimensions": [width, height],
        "mpp": mpp,
        "mpp_source": "given",
    }
    tiling = {"mpp": mpp, "tile_size": tile_size, "overlap": 0, "tile_size_level0": tile_size}
    tiling.update(qc_thresholds or {})
    path = Path(root) / "slides" / f"{slide_id}.zarr"
    path.parent.mkdir(parents=True, exist_ok=True)
    store = SlideStore.create(
        path,
        source=source,
        tiling=tiling,
        coords=coords,
        tile_size=tile_size if tiles is None else int(tiles.shape[1]),
        tiles_per_shard=max(1, n),
        codec="zstd",
        jpeg_quality=90,
        thumbnail=thumbnail,
        tissue_mask=mask,
        tissue_fraction=np.ones(n, dtype=np.float32),
    )
    if tiles is not None and n:
        store.write_tiles(0, np.ascontiguousarray(tiles, dtype=np.uint8))
    if qc:
        store.write_qc(qc)
    attrs = {
        "encoder_id": encoder_id,
        "encoder": encoder or {},
        "slide_id": slide_id,
        "n_tiles": n,
        "dim": dim,
        "dtype": dtype,
        "coords_sha256": coords_sha256(coords),
    }
    writer = EmbeddingWriter(path, encoder_id, n_rows=n, dim=dim, dtype=dtype, attrs=attrs)
    if n:
        writer.write(0, features)
    writer.commit()
    store.mark_complete()
    if name is not None:
        Catalog(Path(root) / "catalog.sqlite").upsert(
            slide_id=slide_id,
            path=name,
            fingerprint=slide_id,
            status=STATUS_COMPLETE,
            n_tiles=n,
            tiling=tiling,
        )
    return path
