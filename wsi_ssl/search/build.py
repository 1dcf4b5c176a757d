"""FAISS index construction, calibration of the search parameter, search parameters, compaction.

Everything here works on a :class:`VectorSource` (ids plus L2-normalised float32 vectors, in
batches), so the archive build and the synthetic benchmark run the same code.

Kinds (all score by inner product of L2-normalised vectors = cosine similarity):

* ``flat``: ``IndexIDMap(IndexFlatIP)``, exact. Removal: ``remove_ids``.
* ``hnsw``: ``IndexIDMap(IndexHNSWFlat, inner product)``. HNSW cannot delete nodes, so a
  removed slide is a *tombstone*: its ids are excluded at query time with an ``IDSelector``
  and the graph is rebuilt from the stored vectors (:func:`compact`) once tombstones exceed
  ``COMPACT_FRACTION`` of the vectors.
* ``ivfpq``: ``IndexIVFPQ`` (L2 on unit vectors, which ranks as inner product:
  ``|q - x|^2 = 2 - 2 q.x``), optionally behind an ``OPQMatrix`` rotation
  (``IndexPreTransform``); the coarse quantiser is flat for small ``N * nlist`` and an HNSW
  over the centroids beyond (so assigning 10M vectors to 8k lists is cheap). Removal: ``remove_ids``.

Calibration: ``calibration_queries`` indexed vectors are searched exactly and approximately;
recall@10 (the query's own id left out of both lists) is measured for increasing ``efSearch``
/ ``nprobe`` and the smallest value reaching ``target_recall + CALIBRATION_MARGIN`` is kept.
The margin (about 5 standard errors of a recall measured on 256 queries, and the gap seen
between indexed-vector queries and fresh ones on clustered data) makes the recorded promise
hold on fresh queries. When no value reaches it (PQ's quantisation error caps IVF-PQ's recall), the
smallest value within 0.002 of the best recall is kept and ``met`` is recorded as false.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np

from wsi_ssl.search.config import IndexConfig

__all__ = [
    "CALIBRATION_K",
    "COMPACT_FRACTION",
    "ArraySource",
    "VectorSource",
    "build_faiss",
    "calibrate",
    "compact",
    "exact_neighbours",
    "search_params",
    "to_similarity",
]

CALIBRATION_K = 10
GT_DEPTH = 2 * CALIBRATION_K + 1
"""Exact neighbours kept per calibration query: ties with the k-th (duplicate tiles, such as
a slide scanned twice) count as correct answers when they fall within this depth."""
CALIBRATION_MARGIN = 0.02
COMPACT_FRACTION = 0.2
EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
NPROBE = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


class VectorSource(Protocol):
    """Ids and unit vectors to index, in batches; rows are numbered ``0 .. n`` in batch order."""

    n: int
    dim: int

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


# -- sampling ---------------------------------------------------------------------------------


def _gather(source: VectorSource, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


# -- building ---------------------------------------------------------------------------------


def _log(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def new_index(plan: dict[str, Any], dim: int) -> Any:
    """An empty (untrained for IVF-PQ) FAISS index for ``plan``."""
    import faiss

    if plan["kind"] == "flat":
        return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    if plan["kind"] == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, int(plan["M"]), faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = int(plan["efConstruction"])
        return faiss.IndexIDMap(hnsw)
    raise ValueError(f"no untrained constructor for kind {plan['kind']!r}")


PQ_TRAIN = 16384
"""PQ codebooks train on at most this many vectors (8-bit codebooks need 39 * 256)."""
OPQ_SAMPLE = 20000


def _opq_gain(sample: np.ndarray, m: int, nbits: int, seed: int) -> tuple[Any, float]:
    """Train OPQ on half of ``sample``; returns (opq, relative reduction of the PQ
    reconstruction MSE on the other half)."""
    import faiss

    dim = sample.shape[1]
    half = len(sample) // 2
    fit, held = sample[:half], sample[half:]

    def pq_mse(train: np.ndarray, test: np.ndarray) -> float:
        pq = faiss.ProductQuantizer(dim, m, nbits)
        pq.cp.seed = seed
        pq.cp.niter = 15
        pq.train(train)
        # faiss's stubs give decode the SWIG signature (codes, out) -> None; the Python
        # wrapper takes the codes and returns the vectors
        rec = pq.decode(pq.compute_codes(test))  # type: ignore[call-arg, func-returns-value]
        return float(((rec - test) ** 2).sum(axis=1).mean())

    opq = faiss.OPQMatrix(dim, m)
    opq.niter = 10
    opq.niter_pq = 4
    opq.train(fit)
    base = pq_mse(fit, held)
    rotated = pq_mse(opq.apply(fit), opq.apply(held))
    return opq, (base - rotated) / base if base > 0 else 0.0


def _train_ivfpq(
    train: np.ndarray, plan: dict[str, Any], config: IndexConfig, progress: Any
) -> tuple[Any, dict[str, Any]]:
    import faiss

    dim = train.shape[1]
    m, nbits, nlist = int(plan["pq_m"]), int(plan["pq_nbits"]), int(plan["nlist"])
    info: dict[str, Any] = {}
    opq = None
    opq_min_train = 2 * 39 * (1 << nbits)  # both halves must train a codebook cleanly
    wide = dim // m >= 4
    if plan["opq"] == "on" or (plan["opq"] == "auto" and wide):
        if len(train) < opq_min_train:
            info["opq_skipped"] = f"{len(train)} training vectors, OPQ needs {opq_min_train}"
        else:
            t0 = time.perf_counter()
            opq, gain = _opq_gain(train[: min(len(train), OPQ_SAMPLE)], m, nbits, config.seed)
            info["opq_gain"] = round(gain, 4)
            info["opq_train_s"] = round(time.perf_counter() - t0, 2)
            if plan["opq"] == "auto" and gain < config.opq_min_gain:
                opq = None
            _log(progress, f"OPQ lowers PQ error by {gain:.1%}: {'kept' if opq else 'dropped'}")
    elif plan["opq"] == "auto":
        info["opq_skipped"] = f"{dim // m}-d sub-vectors: a rotation has little to gain"
    info["opq"] = opq is not None
    xt = opq.apply(train) if opq is not None else train
    t0 = time.perf_counter()
    km = faiss.Kmeans(dim, nlist, niter=10, seed=config.seed, verbose=False)
    km.train(xt)
    assert km.centroids is not None  # set by train()
    quantizer: faiss.Index
    if plan["quantizer"] == "hnsw":
        quantizer = faiss.IndexHNSWFlat(dim, 32)
        quantizer.hnsw.efConstruction = 80
        quantizer.hnsw.efSearch = 128
    else:
        quantizer = faiss.IndexFlatL2(dim)
    quantizer.add(km.centroids)
    ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, faiss.METRIC_L2)
    ivf.cp.seed = config.seed
    ivf.pq.cp.seed = config.seed
    ivf.pq.cp.niter = 15
    # the quantiser already holds nlist centroids, so this trains the PQ codebooks only
    ivf.train(xt[: max(PQ_TRAIN, 39 * (1 << nbits))])
    info["train_s"] = round(time.perf_counter() - t0, 2)
    if opq is None:
        return ivf, info
    return faiss.IndexPreTransform(opq, ivf), info  # the wrapper keeps references to both


def build_faiss(
    source: VectorSource,
    plan: dict[str, Any],
    config: IndexConfig,
    *,
    progress: Callable[[str], None] | None = None,
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Build and calibrate an index over ``source``.

    Returns:
        ``(index, params, calibration)``: ``params`` is ``plan`` plus what the build derived
        (``efSearch`` / ``nprobe``, ``faiss_metric``, timings); ``calibration`` the recall
        measurements.
    """
    params = dict(plan)
    kind = plan["kind"]
    rng = np.random.default_rng(config.seed)
    n_q = min(config.calibration_queries, source.n) if kind != "flat" else 0
    t0 = time.perf_counter()
    if kind == "ivfpq":
        train_n = int(plan["train_size"])
        rows = np.unique(
            np.concatenate(
                [
                    rng.choice(source.n, size=train_n, replace=False),
                    rng.choice(source.n, size=n_q, replace=False),
                ]
            )
        )
        ids_all, vecs_all = _gather(source, rows)
        perm = rng.permutation(len(rows))
        train = vecs_all[perm[:train_n]]
        q_sel = rng.choice(len(rows), size=n_q, replace=False)
        q_ids, q_vecs = ids_all[q_sel], vecs_all[q_sel]
        del vecs_all
        _log(
            progress,
            f"training IVF{plan['nlist']},PQ{plan['pq_m']}x{plan['pq_nbits']} on {len(train)}",
        )
        index, info = _train_ivfpq(train, plan, config, progress)
        del train
        params.update(info)
        heap = None
        if n_q:
            import faiss

            heap = faiss.ResultHeap(n_q, GT_DEPTH, keep_max=True)
        for ids, vecs in source.batches():
            index.add_with_ids(vecs, ids)
            if heap is not None:
                import faiss

                flat = faiss.IndexFlatIP(source.dim)
                flat.add(vecs)
                d, i = flat.search(q_vecs, min(GT_DEPTH, len(vecs)))
                heap.add_result(
                    np.ascontiguousarray(d), np.where(i >= 0, ids[np.maximum(i, 0)], -1)
                )
            _log(progress, f"added {index.ntotal}/{source.n}")
        if heap is not None:
            heap.finalize()
            gt = (heap.D, heap.I)
        params["faiss_metric"] = "l2"
    else:
        index = new_index(plan, source.dim)
        for ids, vecs in source.batches():
            index.add_with_ids(vecs, ids)
            _log(progress, f"added {index.ntotal}/{source.n}")
        params["faiss_metric"] = "ip"
        if n_q:
            rows = np.sort(rng.choice(source.n, size=n_q, replace=False))
            q_vecs, q_ids, gt = _hnsw_ground_truth(index, rows)
    params["build_s"] = round(time.perf_counter() - t0, 2)
    if kind == "flat" or not n_q:
        calibration = {"exact": kind == "flat", "k": CALIBRATION_K, "queries": 0}
        if kind == "flat":
            calibration["recall_at_k"] = 1.0
            calibration["met"] = True
        else:
            params.update(_default_search(kind, params))
        return index, params, calibration
    calibration = calibrate(index, params, q_vecs, q_ids, gt, config.target_recall)
    params.update(calibration.pop("chosen"))
    return index, params, calibration


def _hnsw_ground_truth(
    index: Any, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Queries = stored vectors at ``rows``; exact neighbours from the HNSW's flat storage."""
    import faiss

    import_ids = faiss.vector_to_array(index.id_map)
    hnsw = cast("faiss.IndexHNSW", faiss.downcast_index(index.index))  # typed as the base
    storage = faiss.downcast_index(hnsw.storage)
    q = storage.reconstruct_batch(rows.astype(np.int64))
    sims, internal = storage.search(q, min(GT_DEPTH, index.ntotal))
    gt = np.where(internal >= 0, import_ids[np.maximum(internal, 0)], -1)
    return q, import_ids[rows], (sims, gt)


def _default_search(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    if kind == "hnsw":
        return {"efSearch": 64}
    if kind == "ivfpq":
        return {"nprobe": min(int(params["nlist"]), 16)}
    return {}


def tie_aware_recall(
    found: np.ndarray,
    gt_sims: np.ndarray,
    gt_ids: np.ndarray,
    k: int,
    own: np.ndarray | None = None,
) -> float:
    """Recall@k of ``found`` ids against exact ``(gt_sims, gt_ids)`` (best first, deeper than
    ``k``); any exact neighbour as similar as the k-th counts as correct (ties), and a
    query's own id (``own``) is left out of both lists.
    """
    total = 0.0
    for row in range(len(found)):
        keep = gt_ids[row] >= 0
        if own is not None:
            keep &= gt_ids[row] != own[row]
        ids, sims = gt_ids[row][keep], gt_sims[row][keep]
        want = min(k, len(ids))
        if want == 0:
            total += 1.0
            continue
        valid = set(ids[sims >= sims[want - 1] - 1e-6].tolist())
        got = [i for i in found[row].tolist() if i >= 0 and (own is None or i != own[row])][:k]
        total += min(want, len(valid.intersection(got))) / want
    return total / max(1, len(found))


def calibrate(
    index: Any,
    params: dict[str, Any],
    queries: np.ndarray,
    q_ids: np.ndarray,
    gt: tuple[np.ndarray, np.ndarray],
    target: float,
) -> dict[str, Any]:
    """Smallest ``efSearch`` / ``nprobe`` reaching ``target`` recall@10 (+ margin)."""
    kind = params["kind"]
    name = "efSearch" if kind == "hnsw" else "nprobe"
    values = EF_SEARCH if kind == "hnsw" else [v for v in NPROBE if v <= int(params["nlist"])]
    want = min(1.0, target + CALIBRATION_MARGIN)
    curve: list[tuple[int, float]] = []
    for value in values:
        p = {**params, name: value}
        _, found = index.search(
            queries, CALIBRATION_K + 1, params=search_params(p, CALIBRATION_K + 1)
        )
        rec = tie_aware_recall(found, gt[0], gt[1], CALIBRATION_K, q_ids)
        curve.append((value, round(rec, 4)))
        if rec >= want:
            break
        if len(curve) >= 4 and rec - curve[-4][1] < 0.001:  # plateau (PQ error)
            break
    best = max(r for _, r in curve)
    met = best >= want
    if met:
        value, rec = next((v, r) for v, r in curve if r >= want)
    else:
        value, rec = next((v, r) for v, r in curve if r >= best - 0.002)
    return {
        "k": CALIBRATION_K,
        "queries": len(queries),
        "target_recall": target,
        "margin": CALIBRATION_MARGIN,
        "recall_at_k": rec,
        "met": met,
        "promised_recall": target if met else round(max(0.0, rec - CALIBRATION_MARGIN), 4),
        "parameter": name,
        "curve": curve,
        "chosen": {name: value},
    }


# -- searching ---------------------------------------------------------------------------------


def search_params(params: dict[str, Any], k: int, selector: Any = None) -> Any:
    """FAISS ``SearchParameters`` for an index built from ``params``, returning ``k`` hits.

    HNSW's beam is widened to ``k`` when ``k`` exceeds the calibrated ``efSearch``. The
    caller must keep ``selector`` alive while the parameters are in use.
    """
    import faiss

    # faiss's stubs lack SearchParametersHNSW and type the constructors without the keyword
    # arguments its Python wrapper accepts (SearchParametersXX(field=value, ...))
    kind = params["kind"]
    if kind == "flat":
        if selector is None:
            return None
        return faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
            efSearch=max(int(params.get("efSearch", 64)), k), sel=selector
        )
    ivf = faiss.SearchParametersIVF(nprobe=int(params.get("nprobe", 16)))  # type: ignore[call-arg]
    if selector is not None:
        ivf.sel = selector
    if params.get("quantizer") == "hnsw":
        ivf.quantizer_params = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
            efSearch=max(64, 2 * int(params.get("nprobe", 16)))
        )
    if params.get("opq"):
        return faiss.SearchParametersPreTransform(index_params=ivf)  # type: ignore[call-arg]
    return ivf


def remove_range(index: Any, params: dict[str, Any], lo: int, hi: int) -> int:
    """Remove ids in ``[lo, hi)`` from a flat or IVF-PQ index; returns how many went."""
    import faiss

    if params["kind"] == "hnsw":
        raise ValueError("HNSW cannot remove vectors; use tombstones and compact()")
    return int(index.remove_ids(faiss.IDSelectorRange(lo, hi)))


def compact(index: Any, params: dict[str, Any], dead: Callable[[np.ndarray], np.ndarray]) -> Any:
    """A new HNSW index holding the live vectors of ``index`` (``dead(ids)`` marks tombstones)."""
    import faiss

    ids = faiss.vector_to_array(index.id_map)
    hnsw = cast("faiss.IndexHNSW", faiss.downcast_index(index.index))  # typed as the base
    storage = faiss.downcast_index(hnsw.storage)
    keep = np.flatnonzero(~dead(ids))
    fresh = new_index(params, index.d)
    step = 65536
    for start in range(0, len(keep), step):
        rows = keep[start : start + step]
        fresh.add_with_ids(storage.reconstruct_batch(rows.astype(np.int64)), ids[rows])
    return fresh


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean fraction of each row's exact top-``k`` ids found in the same row of ``found``."""
    found, exact = np.asarray(found)[:, :k], np.asarray(exact)[:, :k]
    if not len(exact):
        return math.nan
    return float(
        np.mean(
            [
                len(set(f[f >= 0]) & set(e[e >= 0])) / max(1, (e >= 0).sum())
                for f, e in zip(found, exact, strict=True)
            ]
        )
    )
