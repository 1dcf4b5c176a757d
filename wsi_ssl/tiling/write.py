"""Write one slide's store at one scale: plan the grid on the tissue mask, create the store,
and run the extraction graph into it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from wsi_ssl.annotations import restrict_to_roi
from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import NoTissueError
from wsi_ssl.slide import SlideReader
from wsi_ssl.storage import SlideStore
from wsi_ssl.tiling.extract import Extracted, extract
from wsi_ssl.tiling.grid import TileGrid
from wsi_ssl.tiling.replace import check_plan
from wsi_ssl.tiling.source import SlideSource
from wsi_ssl.tissue import tissue_fraction

__all__ = ["extract_with_progress", "write_store"]

DARK_BACKGROUND = 60
"""Median thumbnail brightness (0-255) under which a slide without tissue is taken for a
fluorescence scan (brightfield glass is 200-245)."""


def write_store(
    source: SlideSource,
    store_path: Path,
    config: TilingConfig,
    scheduler: Any,
    workers: int | None,
    progress: bool,
    *,
    previous: SlideStore | None = None,
    discard_embeddings: bool = False,
) -> tuple[int, tuple[str, ...]]:
    """Write the slide's store at ``store_path`` (left with status "writing"); the tiles
    written, and what the report should say of its ROI file (``TileLabels.notes``)."""
    reader = source.reader
    slide_mpp = source.slide_mpp()
    grid = TileGrid.for_slide(reader, slide_mpp, config)
    thumbnail, mask = source.thumbnail_and_mask()
    level0_per_px = reader.dimensions[0] / thumbnail.shape[1]
    coords = grid.all_coords()
    fraction = tissue_fraction(mask, coords, grid.tile_size_level0, level0_per_px)
    keep = fraction >= config.tissue_threshold
    if not keep.any():
        dark = float(np.median(thumbnail)) < DARK_BACKGROUND
        raise NoTissueError(reader.path, config.tissue_threshold, dark=dark)
    keep, labels = restrict_to_roi(
        config, keep, coords, grid.tile_size_level0, mask.shape, level0_per_px
    )
    check_plan(previous, source.fingerprint, config, coords[keep], discard_embeddings)
    store = SlideStore.create(
        store_path,
        source={
            "path": str(reader.path.resolve()),
            "name": source.path.name,  # as given: a link's name names the slide
            "fingerprint": source.fingerprint,
            "reader": reader.backend,
            "vendor": reader.vendor,
            "dimensions": list(reader.dimensions),
            "mpp": slide_mpp,
            "mpp_source": reader.mpp_source,
            "level_count": reader.level_count,
        },
        tiling={**config.output_key(), **grid.to_dict()},
        coords=coords[keep],
        tile_size=config.tile_size,
        tiles_per_shard=config.tiles_per_chunk,
        codec=config.codec,
        jpeg_quality=config.jpeg_quality,
        thumbnail=thumbnail,
        tissue_mask=mask,
        tissue_fraction=fraction[keep],
    )
    if labels is not None:
        store.write_labels("annotations", labels.fractions[keep], labels.classes)
    extracted = extract_with_progress(
        reader, grid, coords[keep], store, config, scheduler, workers, progress
    )
    store.write_qc(extracted.scores)
    if extracted.shard_checksums is not None:
        store.write_shard_checksums(extracted.shard_checksums)
    return extracted.n_tiles, () if labels is None else labels.notes


def extract_with_progress(
    reader: SlideReader,
    grid: TileGrid,
    coords: np.ndarray,
    store: SlideStore,
    config: TilingConfig,
    scheduler: Any,
    workers: int | None,
    progress: bool,
) -> Extracted:
    """Run the extraction graph into ``store`` with a progress bar of its tiles (QC-scored
    when ``config.qc``)."""
    desc = f"{reader.path.name[:24]} @{config.mpp:g}"
    with tqdm(
        total=len(coords),
        desc=desc,
        unit="tile",
        leave=False,
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        return extract(
            reader,
            grid,
            coords,
            store.path / "tiles",
            config.tiles_per_chunk,
            scheduler=scheduler,
            workers=workers,
            on_chunk=bar.update,
            qc=config.qc,
        )
