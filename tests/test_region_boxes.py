"""Region hits' boxes are the windows that were scored: whole grid cells on the hit slide's
tile grid (cut at the slide's edge), never overlapping one another, holding their matched
tiles, for query boxes that are not a whole number of tiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsi_ssl.search import SearchIndex
from wsi_ssl.search.queries import clip_box
from wsi_ssl.storage import open_store

BOXES = [(300, 300), (322, 600), (500, 330)]


def _is_window(
    box: tuple[int, int, int, int],
    stride: float,
    cells: tuple[int, int],
    dimensions: tuple[int, int],
) -> bool:
    """``box`` spans ``cells`` = (cols, rows) whole grid cells from a grid position, its level-0
    edges rounded as the tiling rounds tile positions, cut only at the slide's edge."""
    for start, length, n, extent in zip(box[:2], box[2:], cells, dimensions, strict=True):
        first = round(start / stride)
        if start != round(first * stride) or start >= extent:
            return False
        if length != min(round((first + n) * stride), extent) - start:
            return False
    return True


@pytest.fixture(params=["small_archive", "serve_archive"])
def root(request: pytest.FixtureRequest) -> Path:
    """An archive with one index: two small synthetic slides, or CMU-1-Small-Region, its twin
    and a synthetic slide (224 px tiles, every one or every tissue tile kept)."""
    value: Any = request.getfixturevalue(request.param)
    return Path(value["root"] if isinstance(value, dict) else value)


@pytest.mark.parametrize("size", BOXES, ids=[f"{w}x{h}" for w, h in BOXES])
def test_region_hits_are_disjoint_whole_windows_holding_their_tiles(
    root: Path, size: tuple[int, int]
) -> None:
    index = SearchIndex.open(root)
    store = open_store(root)
    query_slide = max(store.slide_ids, key=lambda s: len(store.slide(s).coords))
    coords = store.slide(query_slide).coords
    x0, y0 = (int(v) for v in coords[len(coords) // 3])
    box = (x0 + 17, y0 + 9, *size)  # off the grid as well
    result = index.search_region(query_slide, box, k=20)
    assert result.query.box == clip_box(box, store.slide(query_slide).source["dimensions"])
    hits = result.hits
    assert len(hits) >= 4
    for hit in hits:
        slide = store.slide(hit.slide_id)
        stride = float(slide.tiling["stride_level0"])
        width, height = (int(v) for v in slide.source["dimensions"])
        # the query box's size in the hit slide's grid cells, as the windows are scored
        cells = [
            max(1, round(um / (stride * float(slide.source["mpp"])))) for um in result.query.size_um
        ]
        assert _is_window(hit.box, stride, (cells[0], cells[1]), (width, height)), hit.box
        x, y, w, h = hit.box
        tiles = slide.coords[np.asarray(hit.tiles, dtype=np.int64)]
        assert len(tiles) == hit.n_tiles > 0
        assert ((tiles[:, 0] >= x) & (tiles[:, 0] < x + w)).all(), (hit.box, tiles)
        assert ((tiles[:, 1] >= y) & (tiles[:, 1] < y + h)).all(), (hit.box, tiles)
    overlapping = [
        (a.slide_id, a.box, b.box)
        for i, a in enumerate(hits)
        for b in hits[i + 1 :]
        if a.slide_id == b.slide_id
        and a.box[0] < b.box[0] + b.box[2]
        and b.box[0] < a.box[0] + a.box[2]
        and a.box[1] < b.box[1] + b.box[3]
        and b.box[1] < a.box[1] + a.box[3]
    ]
    assert not overlapping


def test_the_best_box_of_a_slide_hit_is_whole_cells(root: Path) -> None:
    """Slide hits show their best window the same way."""
    index = SearchIndex.open(root)
    store = open_store(root)
    sid = store.slide_ids[0]
    coords = store.slide(sid).coords
    x0, y0 = (int(v) for v in coords[0])
    query = index.query_region(sid, (x0, y0, 322, 600))
    for hit in index.search(query, k=5, mode="slides").hits:
        slide = store.slide(hit.slide_id)
        stride = float(slide.tiling["stride_level0"])
        width, height = (int(v) for v in slide.source["dimensions"])
        assert hit.best_box is not None
        assert _is_window(hit.best_box, stride, (1, 3), (width, height)), hit.best_box
