"""Which tiles of the stores a pretraining run trains on.

:func:`select_tiles` keeps the tiles worth training on: enough tissue (the store's own
``tissue_fraction``), enough grey-level variation (no blank glass or flat smears), not flagged
by the store's QC (with ``skip_flagged``: :func:`wsi_ssl.tiling.qc.kept_tiles`), and, with a
curation file (:mod:`wsi_ssl.ssl.curation`), only the curated ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsi_ssl.errors import ConfigError
from wsi_ssl.ssl.stores import SlideEntry
from wsi_ssl.storage import open_store
from wsi_ssl.storage.tile_reader import TileReader

__all__ = ["select_tiles"]


def select_tiles(
    entries: Sequence[SlideEntry],
    *,
    min_tissue: float = 0.0,
    min_tile_std: float = 0.0,
    curation: str | Path | None = None,
    skip_flagged: bool = False,
) -> list[np.ndarray] | None:
    """Per store, the tile numbers to train on (None: all of them).

    A tile is kept when its stored tissue fraction is at least ``min_tissue``, the standard
    deviation of its grey levels (0-255) at least ``min_tile_std`` (read once per run), and the
    curation file, if any, selects it; with ``skip_flagged``, QC must not have flagged it.
    Raises ``ConfigError`` when nothing is left.
    """
    if min_tissue <= 0 and min_tile_std <= 0 and curation is None and not skip_flagged:
        return None
    chosen = None
    if curation is not None:
        from wsi_ssl.ssl.curation import read_curation

        chosen = read_curation(curation, entries)
    keep: list[np.ndarray] = []
    for i, e in enumerate(entries):
        tiles = np.arange(e.n_tiles) if chosen is None else chosen[i]
        if skip_flagged:
            from wsi_ssl.tiling.qc import kept_tiles

            tiles = tiles[kept_tiles(open_store(e.root).slide(e.slide_id))[tiles]]
        if min_tissue > 0:
            fraction = np.asarray(open_store(e.root).slide(e.slide_id).tissue_fraction)
            tiles = tiles[fraction[tiles] >= min_tissue]
        if min_tile_std > 0 and len(tiles):
            reader = TileReader(open_store(e.root).slide(e.slide_id).tiles)
            stds = np.array([_grey_std(reader[int(t)]) for t in tiles])
            tiles = tiles[stds >= min_tile_std]
        keep.append(tiles.astype(np.int64))
    if sum(len(k) for k in keep) == 0:
        raise ConfigError(
            _nothing_left(len(entries), min_tissue, min_tile_std, curation, skip_flagged),
            parameters=("min_tissue", "min_tile_std", "skip_flagged_tiles"),
        )
    return keep


def _nothing_left(
    n: int, min_tissue: float, min_tile_std: float, curation: str | Path | None, flagged: bool
) -> str:
    """Why no tile of ``n`` stores is selected, naming only the tests that were on."""
    tests, advice = [], []
    thresholds = {"min_tissue": min_tissue, "min_tile_std": min_tile_std}
    if any(v > 0 for v in thresholds.values()):
        tests += [f"{name}={value}" for name, value in thresholds.items() if value > 0]
        advice.append("lower the thresholds")
    if flagged:
        tests.append("skip_flagged_tiles=True")
        advice.append("train without skip_flagged_tiles")
    if curation is not None:
        tests.append(f"curation {curation}")
        advice.append("curate again")
    return f"no tile of {n} stores passes {' and '.join(tests)}; {' or '.join(advice)}"


def _grey_std(tile: np.ndarray) -> float:
    return float((tile.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).std())
