"""Vectors to index: the ``VectorSource`` protocol, an in-memory source, normalisation, exact
neighbours and row sampling. Shared by the archive build, calibration, evaluation and the
synthetic benchmark."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "ArraySource",
    "VectorSource",
    "exact_neighbours",
    "gather",
    "normalise",
    "to_similarity",
]


class VectorSource(Protocol):
    """Ids and unit vectors to index, in batches; rows are numbered ``0 .. n`` in batch order."""

    @property
    def n(self) -> int: ...
    @property
    def dim(self) -> int: ...

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids int64 (b,), vectors float32 (b, dim))``, L2-normalised, in row order."""
        ...


@dataclass
class ArraySource:
    """A :class:`VectorSource` over arrays in memory (normalised on the fly)."""

    ids: np.ndarray
    vectors: np.ndarray
    batch: int = 65536

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.n, self.batch):
            stop = min(self.n, start + self.batch)
            yield self.ids[start:stop], normalise(self.vectors[start:stop])


def normalise(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (zero rows stay zero); always a fresh array."""
    out = np.array(x, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def to_similarity(distances: np.ndarray, faiss_metric: str) -> np.ndarray:
    """FAISS distances -> cosine similarity of unit vectors."""
    if faiss_metric == "l2":
        return (1.0 - distances / 2.0).astype(np.float32)
    return distances.astype(np.float32, copy=False)


def gather(source: VectorSource, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of the sorted global ``rows`` of ``source`` (one pass)."""
    out_v = np.empty((len(rows), source.dim), dtype=np.float32)
    out_i = np.empty(len(rows), dtype=np.int64)
    start, got = 0, 0
    for ids, vecs in source.batches():
        stop = start + len(ids)
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi > lo:
            out_v[got : got + hi - lo] = vecs[rows[lo:hi] - start]
            out_i[got : got + hi - lo] = ids[rows[lo:hi] - start]
            got += hi - lo
        start = stop
        if got == len(rows):
            break
    return out_i[:got], out_v[:got]


def exact_neighbours(
    source: VectorSource, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (similarities, ids) of ``queries`` over ``source`` (streamed)."""
    import faiss

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, vecs in source.batches():
        flat = faiss.IndexFlatIP(source.dim)
        flat.add(vecs)
        d, i = flat.search(queries, min(k, len(vecs)))
        heap.add_result(np.ascontiguousarray(d), np.where(i >= 0, ids[np.maximum(i, 0)], -1))
    heap.finalize()
    return heap.D, heap.I
