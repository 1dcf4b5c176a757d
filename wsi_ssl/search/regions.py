"""Merging tile hits into candidate regions, and ranking slides by their hits.

Region scoring (what ``wsi-ssl search --box`` returns):

1. Every query tile ``q_i`` (i = 1..Q) is searched for its ``hits_per_tile`` nearest tiles in
   the index; those are its *matches*.
2. A candidate region is a window of the query box's physical size, rounded to whole cells,
   placed on a target slide's tile grid (the lattice of tile positions, in steps of the tiling
   stride). Its reported box is exactly those cells in level-0 pixels (cut at the slide's
   edge), so a 300x300 px query box on a 224 px grid gives 224x224 px hits.
3. Its score is the **summed similarity of the matched tiles**, one per query tile:
   ``score(R) = sum_i max_{t in R, t a match of q_i} cos(q_i, t)`` (0 for a query tile with no
   match inside ``R``; similarities clipped at 0). Each query tile is credited once, with its
   best match in the region, so the score is at most Q and a region reaches Q only by holding
   an exact copy of every query tile: the query region itself scores Q, and a larger patch of
   merely similar tissue cannot outscore it by holding more tiles. ``score / Q`` (reported as
   ``mean_similarity``) is the query tiles' mean best similarity in the region, and
   ``coverage`` the fraction of query tiles with a match inside it.
4. Windows are chosen greedily over every grid position (per-query-tile window maxima come
   from two 1-D running-max filters, so no placement is skipped): the best-scoring window on
   any slide first, then the best window that does not overlap any window already chosen on
   that slide, and so on; the returned regions (their boxes) never overlap. Ties go to the
   window holding more matched tiles (the sum of each matched tile's best similarity).

Slide ranking (``--slides``): slide ``S`` scores ``(1/Q) sum_i max_{t in S} cos(q_i, t)`` over
the ``Q`` query tiles, taking 0 where query tile ``i`` has no neighbour on ``S``: the mean best
match of the query's tiles on that slide, so a slide must resemble most of the query, not one
tile of it, to rank high. (Yottixel, Kalra et al. 2020, ranks by the median of the same
per-tile best matches; the mean degrades more gracefully when a query tile's neighbours on a
slide fall beyond ``hits_per_tile``.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Window", "best_windows", "slide_scores", "tile_scores"]


@dataclass(frozen=True)
class Window:
    """A chosen window: grid row/col of its top-left cell, its score, the member hits."""

    row: int
    col: int
    score: float
    members: np.ndarray  # indices of the hits (matches) inside the window


def tile_scores(
    slide_numbers: np.ndarray, tiles: np.ndarray, sims: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique (slide, tile) pairs among hits with their best similarity and hit count.

    Args:
        slide_numbers, tiles, sims: flat arrays, one entry per hit (any query tile).

    Returns:
        ``(slides, tiles, best_similarity, n_query_tiles_hitting_it)``.
    """
    keys = (slide_numbers.astype(np.int64) << 32) | tiles.astype(np.int64)
    order = np.lexsort((-sims, keys))
    keys_sorted = keys[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = keys_sorted[1:] != keys_sorted[:-1]
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(order)))
    best = order[starts]
    return slide_numbers[best], tiles[best], np.maximum(sims[best], 0.0), counts


def _window_max(a: np.ndarray, wr: int, wc: int) -> np.ndarray:
    """``out[i, j] = max(a[i:i+wr, j:j+wc])`` for every window inside ``a``."""
    from scipy.ndimage import maximum_filter1d

    out = a
    if wr > 1:
        out = maximum_filter1d(out, wr, axis=0, mode="constant", cval=0.0)
    if wc > 1:
        out = maximum_filter1d(out, wc, axis=1, mode="constant", cval=0.0)
    # a centred filter of size s covers [j - s//2, j - s//2 + s): shift to start at j
    return out[wr // 2 : wr // 2 + a.shape[0] - wr + 1, wc // 2 : wc // 2 + a.shape[1] - wc + 1]


def _window_sum(a: np.ndarray, wr: int, wc: int) -> np.ndarray:
    """``out[i, j] = sum(a[i:i+wr, j:j+wc])`` (summed-area table)."""
    sat = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.float64)
    sat[1:, 1:] = a.cumsum(0).cumsum(1)
    return sat[wr:, wc:] - sat[:-wr, wc:] - sat[wr:, :-wc] + sat[:-wr, :-wc]


def best_windows(
    query_rows: np.ndarray,
    cells: np.ndarray,
    sims: np.ndarray,
    window: tuple[int, int],
    k: int,
    grid_shape: tuple[int, int] | None = None,
) -> list[Window]:
    """Up to ``k`` non-overlapping windows of ``window`` = (rows, cols) grid cells on one slide,
    best first, scored as in the module docstring.

    Args:
        query_rows: (n,) the query tile each hit (match) belongs to.
        cells: int (n, 2) grid (row, col) of each hit's tile.
        sims: (n,) each hit's similarity.
        window: window height and width in grid cells.
        k: windows wanted.
        grid_shape: the slide's (rows, cols); windows are kept inside it when given.

    Returns:
        Windows whose ``members`` index the hits inside them.
    """
    if len(cells) == 0 or k <= 0:
        return []
    wr, wc = max(1, int(window[0])), max(1, int(window[1]))
    rows, cols = cells[:, 0].astype(np.int64), cells[:, 1].astype(np.int64)
    sims = np.maximum(np.asarray(sims, dtype=np.float64), 0.0)
    r_lo, c_lo = max(0, int(rows.min()) - wr + 1), max(0, int(cols.min()) - wc + 1)
    r_hi, c_hi = int(rows.max()), int(cols.max())
    if grid_shape is not None:
        r_hi = max(r_lo, min(r_hi, int(grid_shape[0]) - wr))
        c_hi = max(c_lo, min(c_hi, int(grid_shape[1]) - wc))
    n_r, n_c = r_hi - r_lo + 1, c_hi - c_lo + 1
    shape = (n_r + wr - 1, n_c + wc - 1)
    inside = (rows >= r_lo) & (cols >= c_lo) & (rows - r_lo < shape[0]) & (cols - c_lo < shape[1])
    rr, cc = rows - r_lo, cols - c_lo
    total = np.zeros((n_r, n_c), dtype=np.float64)
    grid = np.zeros(shape, dtype=np.float64)
    for q in np.unique(query_rows[inside]):
        sel = inside & (query_rows == q)
        grid[:] = 0.0
        np.maximum.at(grid, (rr[sel], cc[sel]), sims[sel])
        total += _window_max(grid, wr, wc)
    grid[:] = 0.0
    np.maximum.at(grid, (rr[inside], cc[inside]), sims[inside])
    tiebreak = _window_sum(grid, wr, wc)
    rank = total + 1e-9 * tiebreak
    valid = np.ones_like(total, dtype=bool)
    out = []
    for _ in range(k):
        masked = np.where(valid, rank, -np.inf)
        i, j = divmod(int(np.argmax(masked)), n_c)
        if not total[i, j] > 1e-12 or not valid[i, j]:
            break
        r0, c0 = i + r_lo, j + c_lo
        members = np.flatnonzero((rows >= r0) & (rows < r0 + wr) & (cols >= c0) & (cols < c0 + wc))
        out.append(Window(r0, c0, float(total[i, j]), members))
        valid[max(0, i - wr + 1) : i + wr, max(0, j - wc + 1) : j + wc] = False
    return out


def slide_scores(
    query_rows: np.ndarray, slide_numbers: np.ndarray, sims: np.ndarray, n_queries: int
) -> dict[int, tuple[float, float, int]]:
    """Slide number -> (score, coverage, n_hits) per the module docstring.

    Args:
        query_rows: (n,) which query tile each hit belongs to.
        slide_numbers: (n,) the hit's slide.
        sims: (n,) the hit's similarity.
        n_queries: Q, the number of query tiles.
    """
    out: dict[int, tuple[float, float, int]] = {}
    if len(sims) == 0:
        return out
    for s in np.unique(slide_numbers):
        sel = slide_numbers == s
        q, v = query_rows[sel], np.maximum(sims[sel], 0.0)
        best = np.zeros(n_queries)
        np.maximum.at(best, q, v)
        covered = len(np.unique(q))
        out[int(s)] = (float(best.sum() / n_queries), covered / n_queries, int(sel.sum()))
    return out
