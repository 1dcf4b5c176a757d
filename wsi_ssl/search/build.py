"""Building a FAISS index over a :class:`~wsi_ssl.search.vectors.VectorSource`, calibrated.

The kind's strategy (:mod:`wsi_ssl.search.kinds`) builds and fills the index and samples the
calibration queries; :func:`~wsi_ssl.search.calibration.calibrate` then picks its search
parameter. The archive build and the synthetic benchmark run the same code. The index's
``config.json`` record (:func:`index_record`) and its JSON-able summary
(:func:`index_description`) are made here too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl.search.calibration import CALIBRATION_K, calibrate
from wsi_ssl.search.config import IndexConfig, plan_index
from wsi_ssl.search.kinds import Progress, index_kind, log
from wsi_ssl.search.vectors import VectorSource

if TYPE_CHECKING:
    from wsi_ssl.search.archive import Collected
    from wsi_ssl.search.index import SearchIndex

__all__ = [
    "build_faiss",
    "index_description",
    "index_record",
    "plan_build",
    "search_params",
    "utc_now",
]


def search_params(params: dict[str, Any], k: int, selector: Any = None) -> Any:
    """FAISS ``SearchParameters`` for an index built from ``params``, returning ``k`` hits
    (the caller keeps ``selector`` alive while they are in use)."""
    return index_kind(params["kind"]).search_params(params, k, selector)


def plan_build(found: Collected, config: IndexConfig, progress: Progress = None) -> dict[str, Any]:
    """The plan (kind and shape, :func:`~wsi_ssl.search.config.plan_index`) of an index of the
    vectors ``found``, said to ``progress``."""
    n, dim = found.source.n, found.dim
    plan = plan_index(n, dim, config)
    log(
        progress,
        f"building a {plan['kind']} index of {n} vectors ({dim}-d) from {len(found.entries)} slides",
    )
    return plan


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
    kind = index_kind(plan["kind"])
    params = dict(plan)
    rng = np.random.default_rng(config.seed)
    n_q = 0 if kind.exact else min(config.calibration_queries, source.n)
    t0 = time.perf_counter()
    built = kind.build(source, plan, config, rng, n_q, progress)
    params.update(built.info)
    params["faiss_metric"] = kind.faiss_metric
    params["build_s"] = round(time.perf_counter() - t0, 2)
    if kind.search_parameter is None or built.truth is None:
        calibration: dict[str, Any] = {"exact": kind.exact, "k": CALIBRATION_K, "queries": 0}
        if kind.exact:
            calibration |= {"recall_at_k": 1.0, "met": True}
        else:
            params.update(kind.default_search(params))
        return built.index, params, calibration
    assert built.queries is not None and built.query_ids is not None
    calibration = calibrate(
        built.index,
        params,
        kind.search_parameter,
        kind.calibration_values(params),
        kind.search_params,
        built.queries,
        built.query_ids,
        built.truth,
        config.target_recall,
    )
    params.update(calibration.pop("chosen"))
    return built.index, params, calibration


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def index_record(
    plan: dict[str, Any],
    encoder_id: str,
    found: Collected,
    config: IndexConfig,
    index: Any,
    params: dict[str, Any],
    calibration: dict[str, Any],
    chosen: bool = False,
) -> dict[str, Any]:
    """A new index's ``config.json`` record: what was built, from what (``slides_chosen``: from
    the slides the build was given, not every one embedded), and by which versions."""
    import faiss

    from wsi_ssl import __version__

    return {
        "kind": plan["kind"],
        "encoder_id": encoder_id,
        "encoder": found.encoder,
        "metric": "cosine",
        "params": params,
        "calibration": calibration,
        "config": config.to_dict(),
        "tiling": found.tiling,
        "stain": found.stain,
        "n_slides": len(found.active),
        "slides_chosen": chosen,
        "built_n": int(index.ntotal),
        "tombstones": 0,
        "created": utc_now(),
        "updated": utc_now(),
        "wsi_ssl_version": __version__,
        "faiss_version": str(getattr(faiss, "__version__", "unknown")),
    }


def index_description(index: SearchIndex) -> dict[str, Any]:
    """A JSON-able summary of an index (``wsi-ssl index --json``)."""
    r = index.record
    nbytes = int(r["files"]["index.faiss"]["bytes"])
    return {
        "name": index.name,
        "path": str(index.files.path.parent),
        "generation": index.files.path.name,
        "kind": index.kind,
        "encoder_id": index.encoder_id,
        "n_vectors": index.n_vectors,
        "n_slides": len(index.slides),
        "dim": index.dim,
        "tiling": index.tiling,
        "params": index.params,
        "calibration": index.calibration,
        "index_bytes": nbytes,
        "bytes_per_vector": round(nbytes / max(1, int(index.index.ntotal)), 1),
        "stain": r.get("stain", "unknown"),  # "unknown": an index from before it was kept
        "created": r.get("created"),
        "updated": r.get("updated"),
        "tombstones": int(r.get("tombstones", 0)),
    }
