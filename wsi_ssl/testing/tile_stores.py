"""Slide stores written from tiles in memory, for tests and benchmarks of the pretraining stage.

:func:`write_tile_store` writes a slide store from tiles in memory through the storage API,
complete or not, for the bad-input cases no real tiling run produces on purpose (a store left
"writing", a store of another tile size). Real stores come from ``wsi_ssl.tile_slide``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_tile_store"]


def write_tile_store(
    root: str | Path,
    slide_id: str,
    tiles: np.ndarray,
    *,
    complete: bool = True,
    mpp: float = 0.5,
    codec: str = "jpeg",
    tiles_per_shard: int = 16,
) -> Path:
    """Write ``tiles`` (uint8 ``(N, T, T, 3)``) as ``<root>/slides/<slide_id>.zarr``."""
    from wsi_ssl.storage import SlideStore

    tiles = np.asarray(tiles, dtype=np.uint8)
    n, size = len(tiles), int(tiles.shape[1])
    side = max(1, int(np.ceil(np.sqrt(max(n, 1)))))
    coords = np.array([[(i % side) * size, (i // side) * size] for i in range(n)], dtype=np.int64)
    tiling: dict[str, Any] = {
        "mpp": mpp,
        "tile_size": size,
        "overlap": 0,
        "tissue_threshold": 0.25,
        "codec": codec,
        "jpeg_quality": 90,
        "tiles_per_chunk": tiles_per_shard,
        "thumbnail_mpp": 8.0,
        "mpp_effective": mpp,
    }
    path = Path(root) / "slides" / f"{slide_id}.zarr"
    store = SlideStore.create(
        path,
        source={"path": f"{slide_id}.tiff", "fingerprint": f"sha256:{slide_id}", "mpp": mpp},
        tiling=tiling,
        coords=coords,
        tile_size=size,
        tiles_per_shard=tiles_per_shard,
        codec=codec,
        jpeg_quality=90,
        thumbnail=np.full((8, 8, 3), 255, np.uint8),
        tissue_mask=np.ones((8, 8), bool),
        tissue_fraction=np.ones(n, np.float32),
    )
    if n:
        store.write_tiles(0, tiles)
    if complete:
        store.mark_complete()
    return path
