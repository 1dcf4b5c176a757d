"""The demo's search step: a region query on the demo archive that writes a gallery PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl.search.regions import Window, best_windows

if TYPE_CHECKING:
    from wsi_ssl.search.archive import SlideEntry
    from wsi_ssl.search.index import SearchIndex

__all__ = ["demo_region_gallery"]


def _densest_box(index: SearchIndex, slide: SlideEntry, cells: int) -> tuple[int, int, int, int]:
    """Level-0 box of the ``cells`` x ``cells`` tile window holding the most stored tiles."""
    coords = index.coords[slide.offset : slide.offset + slide.n_tiles]
    stride = float(slide.stride_level0)
    grid = np.stack([np.round(coords[:, 1] / stride), np.round(coords[:, 0] / stride)], 1)
    n = len(coords)
    found: Sequence[Window | None] = best_windows(
        np.zeros(n, dtype=np.int64),
        grid.astype(np.int64),
        np.ones(n),
        (cells, cells),
        1,
        (slide.grid_shape[0], slide.grid_shape[1]) if slide.grid_shape else None,
    ) or [None]
    [win] = found
    side = round(cells * stride)
    if win is None:
        return (0, 0, side, side)
    return (round(win.col * stride), round(win.row * stride), side, side)


def demo_region_gallery(
    root: str | Path,
    out: str | Path,
    *,
    encoder: str | None = None,
    index_name: str | None = None,
    k: int = 6,
    cells: int = 3,
    progress: Any = None,
) -> tuple[Any, Path, list[str]]:
    """Query the densest ``cells`` x ``cells``-tile region of the archive's first slide and save
    the gallery of the ``k`` best regions on the other slides (its own slide too when it is
    the only one).

    The archive must be embedded; the index named after the encoder is opened and brought up
    to date (slides embedded since are added), or built (kind auto) when there is none.
    Returns ``(result, png_path, lines_to_print)``.
    """
    from wsi_ssl.search.index import SearchIndex
    from wsi_ssl.storage import open_store
    from wsi_ssl.storage.embeddings import embedding_ids
    from wsi_ssl.storage.index_files import list_indexes

    root = Path(root)
    lines: list[str] = []
    if index_name is None and encoder is None:
        archive = open_store(root)
        ids = sorted({e for s in archive.slide_ids for e in embedding_ids(archive.store_path(s))})
        if len(ids) != 1:
            from wsi_ssl.errors import EmbeddingsNotFoundError

            raise EmbeddingsNotFoundError(root, "<one encoder; pass encoder=>", ids)
        encoder = ids[0]
    name = index_name or encoder
    if name in list_indexes(root):
        index = SearchIndex.open(root, name)
        index.add(progress=progress)
    else:
        index = SearchIndex.build(root, str(encoder), progress=progress)
    lines.append(
        f"index {index.name}: {index.kind}, {index.n_vectors} vectors from "
        f"{len(index.slides)} slides, encoder {index.encoder_id}"
    )
    slide = index.slides[0]
    box = _densest_box(index, slide, cells)
    result = index.search_region(slide.slide_id, box, k=k, exclude_self=len(index.slides) > 1)
    png = index.gallery(result, out)
    lines += result.table().splitlines()
    lines.append(f"gallery: {png}")
    return result, png, lines
