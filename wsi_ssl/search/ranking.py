"""Ranking: raw FAISS neighbours of a query's tiles -> tile, region or slide hits.

The scoring itself (tile scores, best windows, slide scores) is in
:mod:`wsi_ssl.search.regions`; this module maps ids to slides and level-0 boxes through the
index's id map (:class:`~wsi_ssl.search.archive.SlideEntry` rows and the coords array).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from wsi_ssl.search.archive import SlideEntry
from wsi_ssl.search.ids import decode_ids
from wsi_ssl.search.regions import Window, best_windows, slide_scores, tile_scores
from wsi_ssl.search.results import Query, RegionHit, SlideHit, TileHit

__all__ = ["MODES", "Hits", "Mode", "rank"]

Mode = Literal["tiles", "regions", "slides"]
MODES: tuple[Mode, ...] = ("tiles", "regions", "slides")
Hits = list[TileHit] | list[RegionHit] | list[SlideHit]
Box = tuple[int, int, int, int]


class _Matches:
    """Live neighbours, flattened: slide number, tile number, similarity, query row."""

    def __init__(self, sims: np.ndarray, ids: np.ndarray, entries: Sequence[SlideEntry]) -> None:
        q_rows = np.repeat(np.arange(len(ids)), ids.shape[1])
        flat_ids, flat_sims = ids.ravel(), sims.ravel()
        ok = flat_ids >= 0
        slides, tiles = decode_ids(flat_ids[ok])
        q_rows, flat_sims = q_rows[ok], flat_sims[ok]
        active = np.array([e.active for e in entries], dtype=bool)
        alive = active[slides] if len(slides) else np.zeros(0, dtype=bool)
        self.slides, self.tiles = slides[alive], tiles[alive]
        self.sims, self.q_rows = flat_sims[alive], q_rows[alive]


def rank(
    query: Query,
    mode: Mode,
    sims: np.ndarray,
    ids: np.ndarray,
    entries: Sequence[SlideEntry],
    coords: np.ndarray,
    k: int,
) -> Hits:
    """The top ``k`` hits of ``mode`` from the (Q, K) neighbours of the query's tiles;
    ``entries[number]`` is slide ``number`` of the id map, ``coords`` the id map's tile coords."""
    m = _Matches(sims, ids, entries)
    if mode == "tiles":
        return _tile_hits(m, entries, coords, k)
    if mode == "regions":
        return _region_hits(query, m, entries, coords, k)
    return _slide_hits(query, m, entries, coords, k)


def _tile_hits(
    m: _Matches, entries: Sequence[SlideEntry], coords: np.ndarray, k: int
) -> list[TileHit]:
    s, t, best, _ = tile_scores(m.slides, m.tiles, m.sims)
    order = np.argsort(-best, kind="stable")[:k]
    out = []
    for rank_, i in enumerate(order, 1):
        e = entries[int(s[i])]
        x, y = coords[e.offset + int(t[i])]
        out.append(
            TileHit(
                rank_,
                e.slide_id,
                e.name,
                int(t[i]),
                int(x),
                int(y),
                round(e.tile_size_level0),
                float(best[i]),
            )
        )
    return out


def windows(
    entry: SlideEntry,
    coords: np.ndarray,
    q_rows: np.ndarray,
    tiles: np.ndarray,
    sims: np.ndarray,
    size_um: tuple[float, float],
    k: int,
) -> list[tuple[Box, Window]]:
    """Best windows of physical size ``size_um`` on one slide, with level-0 boxes.

    A window is ``size_um`` rounded to whole cells of the slide's tile grid; its box is exactly
    those cells (edges rounded as tile positions are, cut at the slide's edge), so the boxes of
    windows that share no cell share no pixel, and each holds its window's matched tiles."""
    stride, mpp = float(entry.stride_level0), float(entry.mpp)
    xy = coords[entry.offset + tiles]
    cells = np.stack([np.round(xy[:, 1] / stride), np.round(xy[:, 0] / stride)], axis=1).astype(
        np.int64
    )
    wr = max(1, round(size_um[1] / (stride * mpp)))
    wc = max(1, round(size_um[0] / (stride * mpp)))
    grid = (entry.grid_shape[0], entry.grid_shape[1]) if entry.grid_shape else None
    sw, sh = entry.dimensions
    out = []
    for win in best_windows(q_rows, cells, sims, (wr, wc), k, grid):
        x, y = round(win.col * stride), round(win.row * stride)
        w = max(1, min(round((win.col + wc) * stride), sw) - x)
        h = max(1, min(round((win.row + wr) * stride), sh) - y)
        out.append(((x, y, w, h), win))
    return out


def _region_hits(
    query: Query, m: _Matches, entries: Sequence[SlideEntry], coords: np.ndarray, k: int
) -> list[RegionHit]:
    candidates: list[tuple[Any, int, Box, np.ndarray, np.ndarray]] = []
    for number in np.unique(m.slides):
        sel = m.slides == number
        t, s, q = m.tiles[sel], m.sims[sel], m.q_rows[sel]
        for box, win in windows(entries[int(number)], coords, q, t, s, query.size_um, k):
            candidates.append((win.score, int(number), box, t[win.members], q[win.members]))
    candidates.sort(key=lambda c: (-c[0], c[1], c[2][1], c[2][0]))
    n_q = max(1, query.n_tiles)
    out = []
    for rank_, (score, number, box, m_tiles, m_rows) in enumerate(candidates[:k], 1):
        entry = entries[number]
        members = np.unique(m_tiles)
        out.append(
            RegionHit(
                rank_,
                entry.slide_id,
                entry.name,
                box,
                float(score),
                len(members),
                float(score) / n_q,
                len(np.unique(m_rows)) / n_q,
                [int(v) for v in members],
            )
        )
    return out


def _slide_hits(
    query: Query, m: _Matches, entries: Sequence[SlideEntry], coords: np.ndarray, k: int
) -> list[SlideHit]:
    scores = slide_scores(m.q_rows, m.slides, m.sims, query.n_tiles)
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[:k]
    out = []
    for rank_, (number, (score, coverage, n_hits)) in enumerate(ranked, 1):
        entry = entries[number]
        sel = m.slides == number
        side = entry.tile_size_level0 * entry.mpp * 4  # whole-slide queries: 4x4 tiles
        size = query.size_um if query.kind != "slide" else (side, side)
        wins = windows(entry, coords, m.q_rows[sel], m.tiles[sel], m.sims[sel], size, 1)
        out.append(
            SlideHit(
                rank_,
                entry.slide_id,
                entry.name,
                score,
                coverage,
                n_hits,
                wins[0][0] if wins else None,
            )
        )
    return out
