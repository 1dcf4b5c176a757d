"""Approximate search with some vectors left out (an ``IDSelector``), still returning ``k`` hits.

HNSW visits a beam of ``efSearch`` vectors and IVF the vectors of ``nprobe`` lists; a selector
drops the excluded ones among them. When the excluded vectors are the query's nearest (its own
slide) or most of the index (every slide but one label's), too few are left: HNSW returned 2 of
20 hits, and a wider beam that fills up with other hits still misses the nearest ones.
:func:`filtered_search` starts with the effort scaled by the share left out, then grows it
fourfold for each query until two efforts in a row give the same ``k`` hits (or the search is
exhaustive): a filtered query costs about five unfiltered ones when nothing near it is left out.
When few vectors are let through, an index that keeps them whole is searched exactly over them
(:data:`EXACT_MAX`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl.search.ids import decode_ids, exclusion_selector

if TYPE_CHECKING:
    from wsi_ssl.search.kinds import IndexKind

__all__ = ["EXACT_MAX", "faiss_ids", "filtered_search"]

GROWTH = 4
EXACT_MAX = 65_536
"""At most this many vectors let through by a selector, an index that stores them whole (HNSW)
is searched exactly over just those: a label filter keeping 10 of 200 slides cost 195 ms a
query through a widened beam, an exact pass over its 10,000 vectors well under one."""


def filtered_search(
    index: Any,
    kind: IndexKind,
    params: dict[str, Any],
    x: np.ndarray,
    k: int,
    allowed: int,
    left_out: tuple[Sequence[int], np.ndarray | None] = ((), None),
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's (distances, ids) of the ``k`` nearest for each row of ``x`` among the
    ``allowed`` vectors that ``left_out`` (slide numbers, tombstone ids or None) lets through."""
    slides, tombstones = left_out
    selector, keep = exclusion_selector(tombstones, slides)
    if selector is not None and kind.stores_vectors and allowed <= EXACT_MAX:
        ids = faiss_ids(index)
        out = np.isin(decode_ids(ids)[0], np.asarray(slides, dtype=np.int64))
        if tombstones is not None:
            out |= np.isin(ids, tombstones)
        return _exact(index, x, k, np.flatnonzero(~out), ids)
    total = int(index.ntotal)
    widen = total / max(1, allowed)
    dist, ids = index.search(x, k, params=kind.search_params(params, k, selector, widen))
    want = min(k, allowed)
    todo = np.full(len(x), selector is not None and not kind.exact)
    while todo.any() and widen < total:
        widen *= GROWTH
        again = kind.search_params(params, k, selector, widen)
        d, i = index.search(x[todo], k, params=again)
        settled = ((i >= 0).sum(axis=1) >= want) & (np.sort(i) == np.sort(ids[todo])).all(axis=1)
        dist[todo], ids[todo] = d, i
        todo[todo] = ~settled
    del keep  # the selector's parts, alive until here
    return dist, ids


def faiss_ids(index: Any) -> np.ndarray:
    """The ids of an ``IndexIDMap``'s vectors, in its row order."""
    import faiss

    return faiss.vector_to_array(index.id_map)


def _exact(
    index: Any, x: np.ndarray, k: int, rows: np.ndarray, ids_of_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Inner products of ``x`` with the vectors at ``rows`` of an ``IndexIDMap`` over a
    graph index that keeps them whole, top ``k`` first (-1 ids past the last)."""
    import faiss

    graph: Any = faiss.downcast_index(index.index)  # typed as the base Index, without storage
    vectors = faiss.downcast_index(graph.storage).reconstruct_batch(rows.astype(np.int64))
    sims = x.astype(np.float32) @ vectors.T
    n = min(k, len(rows))
    top = np.argsort(-sims, axis=1, kind="stable")[:, :n]
    dist = np.full((len(x), k), -np.inf, dtype=np.float32)
    ids = np.full((len(x), k), -1, dtype=np.int64)
    dist[:, :n] = np.take_along_axis(sims, top, axis=1)
    ids[:, :n] = ids_of_rows[rows][top]
    return dist, ids
