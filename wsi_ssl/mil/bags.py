"""Write a slide store that holds only a bag of embeddings (and optionally tiles).

For tests, benchmarks and demos that compose bags in memory: the store has the attributes,
``coords``, ``thumbnail`` and ``tissue_mask`` of a real one (so MIL training, prediction and
heatmaps read it like any other) and ``embeddings/<encoder_id>`` written through
:class:`~wsi_ssl.storage.embeddings.EmbeddingWriter`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_ssl.storage import SCHEMA_VERSION, STATUS_COMPLETE, Catalog
from wsi_ssl.storage.embeddings import EmbeddingWriter, coords_sha256

__all__ = ["write_bag_store"]


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
) -> Path:
    """Write ``<root>/slides/<slide_id>.zarr`` holding ``features`` as its bag.

    Args:
        root: archive root (created if needed).
        slide_id: the store's id.
        features: (N, D) embeddings; N may be 0 (an empty bag).
        encoder_id: the embeddings' encoder id.
        coords: (N, 2) level-0 x, y (default: tiles laid out row by row on a square grid).
        tiles: optional uint8 (N, T, T, 3) tile pixels (for galleries).
        name: a file name to record in ``catalog.sqlite`` (None: no catalog row).
        tile_size: tile edge in pixels (level 0 = the tiles' scale).
        mpp: microns per pixel of level 0.
        thumbnail_scale: thumbnail pixels per level-0 pixel.
        dtype: stored dtype of the embeddings.
        encoder: encoder config recorded with the embeddings.

    Returns:
        The store's path.
    """
    features = np.asarray(features)
    n, dim = features.shape
    if coords is None:
        side = max(1, math.ceil(math.sqrt(n)))
        i = np.arange(n)
        coords = np.stack([(i % side) * tile_size, (i // side) * tile_size], axis=1)
    coords = np.asarray(coords, dtype=np.int64).reshape(n, 2)
    width = int(coords[:, 0].max() + tile_size) if n else tile_size
    height = int(coords[:, 1].max() + tile_size) if n else tile_size
    tw, th = max(1, round(width * thumbnail_scale)), max(1, round(height * thumbnail_scale))
    thumbnail = np.full((th, tw, 3), 240, dtype=np.uint8)
    mask = np.zeros((th, tw), dtype=bool)
    for x, y in coords:
        x0, y0 = int(x * thumbnail_scale), int(y * thumbnail_scale)
        x1 = max(x0 + 1, round((x + tile_size) * thumbnail_scale))
        y1 = max(y0 + 1, round((y + tile_size) * thumbnail_scale))
        thumbnail[y0:y1, x0:x1] = (220, 170, 200)
        mask[y0:y1, x0:x1] = True

    path = Path(root) / "slides" / f"{slide_id}.zarr"
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(path, mode="w", zarr_format=3)
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
    group.attrs.update(
        {
            "schema_version": SCHEMA_VERSION,
            "wsi_ssl_version": "bag",
            "status": "writing",
            "source": source,
            "tiling": tiling,
        }
    )
    group.create_array("coords", data=coords)
    group.create_array("tissue_fraction", data=np.ones(n, dtype=np.float32))
    group.create_array("thumbnail", data=thumbnail)
    group.create_array("tissue_mask", data=mask)
    if tiles is not None:
        group.create_array("tiles", data=np.ascontiguousarray(tiles, dtype=np.uint8))
    writer = EmbeddingWriter(
        path,
        encoder_id,
        n_rows=n,
        dim=dim,
        dtype=dtype,
        attrs={
            "encoder_id": encoder_id,
            "encoder": encoder or {},
            "slide_id": slide_id,
            "n_tiles": n,
            "dim": dim,
            "dtype": dtype,
            "coords_sha256": coords_sha256(coords),
        },
    )
    if n:
        writer.write(0, features)
    writer.commit()
    group.attrs["status"] = STATUS_COMPLETE
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
