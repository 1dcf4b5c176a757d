"""One strategy object per index kind: what a flat, HNSW or IVF-PQ index does differently.

All kinds score by the inner product of L2-normalised vectors (= cosine similarity).

* :class:`FlatKind` ``flat``: ``IndexIDMap(IndexFlatIP)``, exact. Removal: ``remove_ids``.
* :class:`HNSWKind` ``hnsw``: ``IndexIDMap(IndexHNSWFlat, inner product)`` (Malkov & Yashunin
  2018). HNSW cannot delete nodes, so a removed slide is a *tombstone*: its ids are excluded at
  query time with an ``IDSelector`` and the graph is rebuilt from the stored vectors
  (:meth:`HNSWKind.compact`) once tombstones exceed ``COMPACT_FRACTION`` of the vectors.
* :class:`IVFPQKind` ``ivfpq``: ``IndexIVFPQ`` (L2 on unit vectors, which ranks as inner
  product: ``|q - x|^2 = 2 - 2 q.x``), optionally behind an ``OPQMatrix`` rotation
  (``IndexPreTransform``); the coarse quantiser is flat for small ``N * nlist`` and an HNSW
  over the centroids beyond (so assigning 10M vectors to 8k lists is cheap). Removal:
  ``remove_ids``.

Each kind plans its build parameters from the data size, builds and fills the FAISS index
(with the calibration queries and their exact neighbours), gives its search parameters, and
says how removal works. :func:`index_kind` looks one up by name.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from wsi_ssl.errors import ConfigError
from wsi_ssl.search.calibration import GT_DEPTH
from wsi_ssl.search.vectors import VectorSource, gather

if TYPE_CHECKING:
    from wsi_ssl.search.config import IndexConfig

__all__ = [
    "COMPACT_FRACTION",
    "KIND_NAMES",
    "PQ_MIN_TRAIN_PER_CENTROID",
    "Built",
    "FlatKind",
    "HNSWKind",
    "IVFPQKind",
    "IndexKind",
    "Progress",
    "index_kind",
    "log",
    "train_ivfpq",
]

COMPACT_FRACTION = 0.2
EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
NPROBE = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
PQ_MIN_TRAIN_PER_CENTROID = 39
"""FAISS warns below 39 training points per centroid (k-means and PQ codebooks alike)."""
PQ_TRAIN = 16384
"""PQ codebooks train on at most this many vectors (8-bit codebooks need 39 * 256)."""
OPQ_SAMPLE = 20000

Progress = Callable[[str], None] | None


def log(progress: Progress, msg: str) -> None:
    """Pass ``msg`` to ``progress`` (nothing when None)."""
    if progress is not None:
        progress(msg)


@dataclass
class Built:
    """A filled FAISS index, what its build derived, and the calibration queries (if any):
    ``queries`` (Q, D), their ids, and their exact neighbours ``(similarities, ids)``."""

    index: Any
    info: dict[str, Any]
    queries: np.ndarray | None = None
    query_ids: np.ndarray | None = None
    truth: tuple[np.ndarray, np.ndarray] | None = None


class IndexKind:
    """What one index kind does; the base is the exact flat index's behaviour."""

    name = ""
    exact = False
    stores_vectors = False  # keeps every vector whole (HNSW's storage): a few can be read back
    tombstones = False
    """Removal marks tombstones (filtered at query time) instead of removing vectors."""
    mmap_inverted_lists = False
    """A memory-mapped read maps the inverted lists (``IO_FLAG_MMAP``) rather than the
    whole file's codes (``IO_FLAG_MMAP_IFC``)."""
    faiss_metric = "ip"
    search_parameter: str | None = None
    """The parameter calibration tunes (None: nothing to tune)."""

    def plan(self, n: int, dim: int, config: IndexConfig) -> dict[str, Any]:
        """Build parameters for ``n`` vectors of ``dim`` (recorded in the index)."""
        return {"kind": self.name}

    def new_index(self, plan: dict[str, Any], dim: int) -> Any:
        """An empty FAISS index for ``plan``."""
        raise NotImplementedError

    def build(
        self,
        source: VectorSource,
        plan: dict[str, Any],
        config: IndexConfig,
        rng: np.random.Generator,
        n_queries: int,
        progress: Progress = None,
    ) -> Built:
        """Build and fill the index; sample ``n_queries`` calibration queries with ``rng``."""
        index = self.new_index(plan, source.dim)
        for ids, vecs in source.batches():
            index.add_with_ids(vecs, ids)
            log(progress, f"added {index.ntotal}/{source.n}")
        return Built(index, {})

    def calibration_values(self, params: dict[str, Any]) -> Sequence[int]:
        return ()

    def default_search(self, params: dict[str, Any]) -> dict[str, Any]:
        """The search parameter used when nothing was calibrated."""
        return {}

    def search_params(
        self, params: dict[str, Any], k: int, selector: Any = None, widen: float = 1.0
    ) -> Any:
        """FAISS ``SearchParameters`` returning ``k`` hits; the caller keeps ``selector`` alive.
        ``widen`` scales the approximate kinds' search effort (HNSW's beam, IVF's probed
        lists): a selector that leaves out most of what the search visits needs more."""
        import faiss

        if selector is None:
            return None
        return faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]

    def remove_range(self, index: Any, params: dict[str, Any], lo: int, hi: int) -> int:
        """Remove ids in ``[lo, hi)``; returns how many went."""
        import faiss

        return int(index.remove_ids(faiss.IDSelectorRange(lo, hi)))

    def compact(
        self, index: Any, params: dict[str, Any], dead: Callable[[np.ndarray], np.ndarray]
    ) -> Any:
        """The index without its tombstoned vectors (kinds without tombstones: unchanged)."""
        return index

    def growth_note(self, ntotal: int, built: int) -> str | None:
        """A note after ``add`` when the index has outgrown its build (None: nothing to say)."""
        return None


class FlatKind(IndexKind):
    name = "flat"
    exact = True

    def new_index(self, plan: dict[str, Any], dim: int) -> Any:
        import faiss

        return faiss.IndexIDMap(faiss.IndexFlatIP(dim))


class HNSWKind(IndexKind):
    name = "hnsw"
    tombstones = True
    stores_vectors = True
    search_parameter = "efSearch"

    def plan(self, n: int, dim: int, config: IndexConfig) -> dict[str, Any]:
        return {
            "kind": self.name,
            "M": config.hnsw_m or 32,
            "efConstruction": config.ef_construction or (64 if n <= 1_000_000 else 80),
        }

    def new_index(self, plan: dict[str, Any], dim: int) -> Any:
        import faiss

        hnsw = faiss.IndexHNSWFlat(dim, int(plan["M"]), faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = int(plan["efConstruction"])
        return faiss.IndexIDMap(hnsw)

    def build(
        self,
        source: VectorSource,
        plan: dict[str, Any],
        config: IndexConfig,
        rng: np.random.Generator,
        n_queries: int,
        progress: Progress = None,
    ) -> Built:
        built = super().build(source, plan, config, rng, n_queries, progress)
        n = int(built.index.ntotal)  # source.n less any slide found unreadable
        if n_queries and n:
            rows = np.sort(rng.choice(n, size=min(n_queries, n), replace=False))
            built.queries, built.query_ids, built.truth = _hnsw_ground_truth(built.index, rows)
        return built

    def calibration_values(self, params: dict[str, Any]) -> Sequence[int]:
        return EF_SEARCH

    def default_search(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"efSearch": 64}

    def search_params(
        self, params: dict[str, Any], k: int, selector: Any = None, widen: float = 1.0
    ) -> Any:
        """HNSW's beam: the calibrated ``efSearch`` (``k`` when more), times ``widen``."""
        import faiss

        beam = math.ceil(max(int(params.get("efSearch", 64)), k) * widen)
        # faiss's stubs lack SearchParametersHNSW and type the constructors without the keyword
        # arguments its Python wrapper accepts (SearchParametersXX(field=value, ...))
        return faiss.SearchParametersHNSW(efSearch=beam, sel=selector)  # type: ignore[attr-defined]

    def remove_range(self, index: Any, params: dict[str, Any], lo: int, hi: int) -> int:
        raise ValueError("HNSW cannot remove vectors; use tombstones and compact()")

    def compact(
        self, index: Any, params: dict[str, Any], dead: Callable[[np.ndarray], np.ndarray]
    ) -> Any:
        """A new HNSW index holding the live vectors of ``index`` (``dead(ids)`` marks tombstones)."""
        import faiss

        ids = faiss.vector_to_array(index.id_map)
        hnsw = cast("faiss.IndexHNSW", faiss.downcast_index(index.index))  # typed as the base
        storage = faiss.downcast_index(hnsw.storage)
        keep = np.flatnonzero(~dead(ids))
        fresh = self.new_index(params, index.d)
        step = 65536
        for start in range(0, len(keep), step):
            rows = keep[start : start + step]
            fresh.add_with_ids(storage.reconstruct_batch(rows.astype(np.int64)), ids[rows])
        return fresh


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


def _pow2_near(x: float) -> int:
    return 1 << max(0, round(math.log2(max(1.0, x))))


def _pq_m(dim: int, wanted: int | None) -> int:
    target = wanted if wanted is not None else max(1, dim // 2)
    target = min(target, dim)
    for m in range(target, 0, -1):
        if dim % m == 0:
            return m
    return 1


class IVFPQKind(IndexKind):
    name = "ivfpq"
    mmap_inverted_lists = True
    faiss_metric = "l2"
    search_parameter = "nprobe"
    rebuild_factor = 4
    """``add`` suggests a rebuild once the index holds this many times its build size."""

    def plan(self, n: int, dim: int, config: IndexConfig) -> dict[str, Any]:
        """IVF lists, PQ shape and training size (see :class:`IndexConfig`).

        Raises:
            ConfigError: too few vectors to train an IVF-PQ index.
        """
        min_n = PQ_MIN_TRAIN_PER_CENTROID * 64
        if n < min_n:
            raise ConfigError(
                f"an IVF-PQ index needs at least {min_n} vectors to train, the archive has {n}; "
                "use kind='flat' (exact) or 'hnsw'",
                parameters=("kind",),
            )
        nlist = config.nlist or min(65536, max(64, _pow2_near(2 * math.sqrt(n))))
        nlist = min(nlist, n // PQ_MIN_TRAIN_PER_CENTROID)
        train = config.train_size or max(40 * nlist, 32768)
        train = max(min(train, n, 1_000_000), min(n, PQ_MIN_TRAIN_PER_CENTROID * nlist))
        # 8-bit codebooks need 39 * 256 training points; fewer points, fewer bits
        nbits = max(4, min(8, int(math.log2(train / PQ_MIN_TRAIN_PER_CENTROID))))
        return {
            "kind": self.name,
            "nlist": int(nlist),
            "pq_m": _pq_m(dim, config.pq_m),
            "pq_nbits": nbits,
            "train_size": int(train),
            # assigning N vectors to nlist flat centroids costs N * nlist * dim; beyond ~4e9
            # (e.g. 2M vectors x 2048 lists) an HNSW over the centroids assigns them instead
            "quantizer": "flat" if nlist <= 4096 and n * nlist <= 4_000_000_000 else "hnsw",
            "opq": config.opq,
        }

    def build(
        self,
        source: VectorSource,
        plan: dict[str, Any],
        config: IndexConfig,
        rng: np.random.Generator,
        n_queries: int,
        progress: Progress = None,
    ) -> Built:
        """Train on a sample, then add every vector while streaming the exact neighbours of
        the calibration queries (drawn from the same sample)."""
        import faiss

        train_n = int(plan["train_size"])
        rows = np.unique(
            np.concatenate(
                [
                    rng.choice(source.n, size=train_n, replace=False),
                    rng.choice(source.n, size=n_queries, replace=False),
                ]
            )
        )
        ids_all, vecs_all = gather(source, rows)  # fewer if a slide was found unreadable
        need = max(int(plan["nlist"]), 1 << int(plan["pq_nbits"]))  # k-means' hard minimum
        if len(ids_all) < need:
            raise ConfigError(
                f"an IVF-PQ index of {plan['nlist']} lists needs at least {need} vectors to "
                f"train; the readable slides hold {len(ids_all)} (the others' embeddings could "
                "not be read: re-embed them), or use kind='flat' (exact) or 'hnsw'",
                parameters=("kind",),
            )
        perm = rng.permutation(len(ids_all))
        train = vecs_all[perm[:train_n]]
        n_queries = min(n_queries, len(ids_all))
        q_sel = rng.choice(len(ids_all), size=n_queries, replace=False)
        q_ids, q_vecs = ids_all[q_sel], vecs_all[q_sel]
        del vecs_all
        log(
            progress,
            f"training IVF{plan['nlist']},PQ{plan['pq_m']}x{plan['pq_nbits']} on {len(train)}",
        )
        index, info = train_ivfpq(train, plan, config, progress)
        del train
        heap = faiss.ResultHeap(n_queries, GT_DEPTH, keep_max=True) if n_queries else None
        for ids, vecs in source.batches():
            index.add_with_ids(vecs, ids)
            if heap is not None:
                flat = faiss.IndexFlatIP(source.dim)
                flat.add(vecs)
                d, i = flat.search(q_vecs, min(GT_DEPTH, len(vecs)))
                heap.add_result(
                    np.ascontiguousarray(d), np.where(i >= 0, ids[np.maximum(i, 0)], -1)
                )
            log(progress, f"added {index.ntotal}/{source.n}")
        if heap is None:
            return Built(index, info)
        heap.finalize()
        return Built(index, info, q_vecs, q_ids, (heap.D, heap.I))

    def calibration_values(self, params: dict[str, Any]) -> Sequence[int]:
        return [v for v in NPROBE if v <= int(params["nlist"])]

    def default_search(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"nprobe": min(int(params["nlist"]), 16)}

    def search_params(
        self, params: dict[str, Any], k: int, selector: Any = None, widen: float = 1.0
    ) -> Any:
        import faiss

        nprobe = min(int(params["nlist"]), math.ceil(int(params.get("nprobe", 16)) * widen))
        ivf = faiss.SearchParametersIVF(nprobe=nprobe)  # type: ignore[call-arg]
        if selector is not None:
            ivf.sel = selector
        if params.get("quantizer") == "hnsw":
            ivf.quantizer_params = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
                efSearch=max(64, 2 * nprobe)
            )
        if params.get("opq"):
            return faiss.SearchParametersPreTransform(index_params=ivf)  # type: ignore[call-arg]
        return ivf

    def growth_note(self, ntotal: int, built: int) -> str | None:
        if ntotal <= self.rebuild_factor * max(1, built):
            return None
        return (
            f"the index now holds {ntotal} vectors, over {self.rebuild_factor}x the "
            f"{built} it was trained for; rebuild it for the best recall and speed"
        )


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


def _maybe_opq(
    train: np.ndarray, plan: dict[str, Any], config: IndexConfig, progress: Progress
) -> tuple[Any, dict[str, Any]]:
    """An OPQ rotation when ``plan["opq"]`` asks for one (and, for "auto", it pays)."""
    dim, m, nbits = train.shape[1], int(plan["pq_m"]), int(plan["pq_nbits"])
    info: dict[str, Any] = {}
    opq = None
    opq_min_train = 2 * 39 * (1 << nbits)  # both halves must train a codebook cleanly
    if plan["opq"] == "on" or (plan["opq"] == "auto" and dim // m >= 4):
        if len(train) < opq_min_train:
            info["opq_skipped"] = f"{len(train)} training vectors, OPQ needs {opq_min_train}"
        else:
            t0 = time.perf_counter()
            opq, gain = _opq_gain(train[: min(len(train), OPQ_SAMPLE)], m, nbits, config.seed)
            info["opq_gain"] = round(gain, 4)
            info["opq_train_s"] = round(time.perf_counter() - t0, 2)
            if plan["opq"] == "auto" and gain < config.opq_min_gain:
                opq = None
            log(progress, f"OPQ lowers PQ error by {gain:.1%}: {'kept' if opq else 'dropped'}")
    elif plan["opq"] == "auto":
        info["opq_skipped"] = f"{dim // m}-d sub-vectors: a rotation has little to gain"
    info["opq"] = opq is not None
    return opq, info


def train_ivfpq(
    train: np.ndarray, plan: dict[str, Any], config: IndexConfig, progress: Progress = None
) -> tuple[Any, dict[str, Any]]:
    """An empty, trained IVF-PQ index (behind OPQ when it pays) and what training measured."""
    import faiss

    dim = train.shape[1]
    m, nbits, nlist = int(plan["pq_m"]), int(plan["pq_nbits"]), int(plan["nlist"])
    opq, info = _maybe_opq(train, plan, config, progress)
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


_KINDS: dict[str, IndexKind] = {k.name: k for k in (FlatKind(), HNSWKind(), IVFPQKind())}
KIND_NAMES = tuple(_KINDS)


def index_kind(name: str) -> IndexKind:
    """The strategy of index kind ``name`` ("flat", "hnsw" or "ivfpq").

    Raises:
        ConfigError: no such kind.
    """
    try:
        return _KINDS[name]
    except KeyError:
        raise ConfigError(f"index kind {name!r}: valid kinds are {', '.join(KIND_NAMES)}") from None
