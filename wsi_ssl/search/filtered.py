"""Approximate search with some vectors left out (an ``IDSelector``), still returning ``k`` hits.

HNSW visits a beam of ``efSearch`` vectors and IVF the vectors of ``nprobe`` lists; a selector
drops the excluded ones among them. When the excluded vectors are the query's nearest (its own
slide) or most of the index (every slide but one label's), too few are left: HNSW returned 2 of
20 hits, and a wider beam that fills up with other hits still misses the nearest ones.
:func:`filtered_search` starts with the effort scaled by the share left out, then grows it
fourfold for each query until two efforts in a row give the same ``k`` hits (slides left out;
tombstones alone: until it has ``k``), or the search is exhaustive. A query with its own slide
left out costs two searches (1 + 4 times the effort) when nothing near it is left out, more
when its nearest are (13x one unfiltered search in ``benchmarks/filtered_search.py``, for
recall 0.997 instead of 0.848). When few vectors are let through, an index that keeps them
whole is searched exactly over them (:data:`EXACT_FLOATS`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl.search.ids import decode_ids, exclusion_selector

if TYPE_CHECKING:
    from wsi_ssl.search.kinds import IndexKind

__all__ = ["EXACT_FLOATS", "filtered_search"]

GROWTH = 4
EXACT_FLOATS = 1 << 24
"""When the vectors a selector lets through hold at most this many floats (64 MB: 43,690
vectors of 384, 10,922 of 1,536), an index that stores them whole (HNSW) is searched exactly
over just those: a label filter keeping 10 of 200 slides cost 195 ms a query through a widened
beam, an exact pass over its 10,000 vectors 0.6 ms. The scores are made in blocks of queries
holding as many floats."""


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
    if selector is not None and kind.stores_vectors and allowed * index.d <= EXACT_FLOATS:
        ids, numbers = _row_ids(index)
        out = np.isin(numbers, np.asarray(slides, dtype=np.int64))
        if tombstones is not None:
            out |= np.isin(ids, tombstones)
        return _exact(index, x, k, np.flatnonzero(~out), ids)
    total = int(index.ntotal)
    widen = total / max(1, allowed)
    dist, ids = index.search(x, k, params=kind.search_params(params, k, selector, widen))
    want = min(k, allowed)
    todo = np.full(len(x), selector is not None and not kind.exact)
    while todo.any() and widen * k < total:  # beyond, the search is exhaustive
        widen *= GROWTH
        again = kind.search_params(params, k, selector, widen)
        d, i = index.search(x[todo], k, params=again)
        settled = (i >= 0).sum(axis=1) >= want
        if len(slides):  # tombstones alone are few: enough hits will do
            settled &= (np.sort(i) == np.sort(ids[todo])).all(axis=1)
        dist[todo], ids[todo] = d, i
        todo[todo] = ~settled
    del keep  # the selector's parts, alive until here
    return dist, ids


_ROW_IDS: weakref.WeakKeyDictionary[Any, tuple[np.ndarray, np.ndarray]] = (
    weakref.WeakKeyDictionary()
)


def _row_ids(index: Any) -> tuple[np.ndarray, np.ndarray]:
    """The ids of an ``IndexIDMap``'s vectors in row order and their slide numbers, kept for
    the index object while its size is unchanged (an HNSW index only grows; it is rebuilt as a
    new object)."""
    import faiss

    cached = _ROW_IDS.get(index)
    if cached is None or len(cached[0]) != index.ntotal:
        ids = faiss.vector_to_array(index.id_map)
        cached = _ROW_IDS[index] = (ids, decode_ids(ids)[0])
    return cached


def _exact(
    index: Any, x: np.ndarray, k: int, rows: np.ndarray, ids_of_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Inner products of ``x`` with the vectors at ``rows`` of an ``IndexIDMap`` over a
    graph index that keeps them whole, top ``k`` first (-1 ids past the last)."""
    import faiss

    graph: Any = faiss.downcast_index(index.index)  # typed as the base Index, without storage
    vectors = faiss.downcast_index(graph.storage).reconstruct_batch(rows.astype(np.int64))
    n = min(k, len(rows))
    dist = np.full((len(x), k), -np.inf, dtype=np.float32)
    ids = np.full((len(x), k), -1, dtype=np.int64)
    block = max(1, EXACT_FLOATS // max(1, len(rows)))
    for start in range(0, len(x), block):
        sims = x[start : start + block].astype(np.float32) @ vectors.T
        top = (
            np.argpartition(-sims, n - 1, axis=1)[:, :n]
            if n < len(rows)
            else np.tile(np.arange(len(rows)), (len(sims), 1))
        )
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        dist[start : start + block, :n] = np.take_along_axis(top_sims, order, axis=1)
        ids[start : start + block, :n] = ids_of_rows[rows][np.take_along_axis(top, order, axis=1)]
    return dist, ids
