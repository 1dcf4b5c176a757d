"""Approximate search with some vectors left out (an ``IDSelector``), still returning ``k`` hits.

HNSW visits a beam of ``efSearch`` vectors and IVF the vectors of ``nprobe`` lists; a selector
drops the excluded ones among them. When the excluded vectors are the query's nearest (its own
slide) or most of the index (every slide but one label's), too few are left: HNSW returned 2 of
20 hits, and a wider beam that fills up with other hits still misses the nearest ones.
:func:`filtered_search` starts with the effort scaled by the share left out, then grows it
fourfold for each query until two efforts in a row give the same ``k`` hits (or the search is
exhaustive): a filtered query costs about five unfiltered ones when nothing near it is left out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from wsi_ssl.search.kinds import IndexKind

__all__ = ["filtered_search"]

GROWTH = 4


def filtered_search(
    index: Any,
    kind: IndexKind,
    params: dict[str, Any],
    x: np.ndarray,
    k: int,
    selector: Any,
    allowed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's (distances, ids) of the ``k`` nearest of the ``allowed`` vectors that
    ``selector`` lets through (None: all of them) for each row of ``x``."""
    total = int(index.ntotal)
    widen = total / max(1, allowed)
    dist, ids = index.search(x, k, params=kind.search_params(params, k, selector, widen))
    if selector is None or kind.exact:
        return dist, ids
    want = min(k, allowed)
    todo = np.ones(len(x), dtype=bool)
    while todo.any() and widen < total:
        widen *= GROWTH
        again = kind.search_params(params, k, selector, widen)
        d, i = index.search(x[todo], k, params=again)
        settled = ((i >= 0).sum(axis=1) >= want) & (np.sort(i) == np.sort(ids[todo])).all(axis=1)
        dist[todo], ids[todo] = d, i
        todo[todo] = ~settled
    return dist, ids
