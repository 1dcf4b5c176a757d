"""Calibration of an approximate index's search parameter, and recall measurements.

``calibration_queries`` indexed vectors are searched exactly and approximately; recall@10 (the
query's own id left out of both lists) is measured for increasing values of the kind's search
parameter (HNSW ``efSearch``, IVF ``nprobe``) and the smallest value reaching ``target_recall +
CALIBRATION_MARGIN`` is kept. The margin (about 5 standard errors of a recall measured on 256
queries, and the gap seen between indexed-vector queries and fresh ones on clustered data)
makes the recorded promise hold on fresh queries. When no value reaches it (PQ's quantisation
error caps IVF-PQ's recall), the smallest value within 0.002 of the best recall is kept and
``met`` is recorded as false.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CALIBRATION_K",
    "CALIBRATION_MARGIN",
    "GT_DEPTH",
    "calibrate",
    "tie_aware_recall",
]

CALIBRATION_K = 10
GT_DEPTH = 2 * CALIBRATION_K + 1
"""Exact neighbours kept per calibration query: ties with the k-th (duplicate tiles, such as
a slide scanned twice) count as correct answers when they fall within this depth."""
CALIBRATION_MARGIN = 0.02

SearchParams = Callable[[dict[str, Any], int], Any]


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
    parameter: str,
    values: Sequence[int],
    search_params: SearchParams,
    queries: np.ndarray,
    q_ids: np.ndarray,
    gt: tuple[np.ndarray, np.ndarray],
    target: float,
) -> dict[str, Any]:
    """Smallest ``parameter`` in ``values`` reaching ``target`` recall@10 (+ margin).

    ``search_params(params, k)`` gives the FAISS search parameters for a trial value.
    """
    want = min(1.0, target + CALIBRATION_MARGIN)
    curve: list[tuple[int, float]] = []
    for value in values:
        p = {**params, parameter: value}
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
        "parameter": parameter,
        "curve": curve,
        "chosen": {parameter: value},
    }
