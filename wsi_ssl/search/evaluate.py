"""Retrieval metrics: mMV@k (slides), precision@k (tiles), recall@k (approximate vs exact).

* **mMV@k** (majority vote at top k, as SISH, Chen et al. 2022, and Yottixel, Kalra et al.
  2020, report it): leave one slide out: query the index with each labelled slide (its
  mosaic, :meth:`SearchIndex.query_slide`), its own tiles excluded; take the top ``k``
  labelled slides of the slide ranking; the predicted label is their majority (ties: the
  label of the best-ranked slide among the tied labels). ``mmv`` is the mean over classes of
  the per-class accuracy (macro), ``accuracy`` the plain fraction of slides right (micro).
* **precision@k** of tile retrieval: for tiles sampled from each labelled slide, the fraction
  of the ``k`` nearest tiles on *other* labelled slides whose slide has the query's label;
  averaged over query tiles (micro) and over classes (macro).
* Both take ``patients`` (slide id -> patient): then every slide of the query's patient is
  left out, not only the query (leave one patient out), so that a patient's other slides
  (re-scans, levels, copies) cannot vote for each other.
* **recall@k**: the fraction of each query's exact top-``k`` ids that the (approximate)
  index returns, averaged over queries; queries default to a sample of the indexed vectors,
  the exact answer is a streamed brute-force search over the same vectors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl.errors import ConfigError
from wsi_ssl.search.archive import ArchiveSource
from wsi_ssl.search.calibration import tie_aware_recall
from wsi_ssl.search.ids import decode_ids
from wsi_ssl.search.vectors import exact_neighbours, gather, normalise

if TYPE_CHECKING:
    from wsi_ssl.search.index import SearchIndex

__all__ = [
    "majority_vote",
    "precision_at_k",
    "recall_at_k",
    "tie_aware_recall",
]


def _labelled(index: SearchIndex, labels: Mapping[str, Any]) -> dict[str, Any]:
    active = {s.slide_id for s in index.slides}
    out = {sid: lab for sid, lab in labels.items() if sid in active}
    if len(out) < 2:
        raise ConfigError(
            f"labels name {len(out)} slide(s) of index {index.name!r}; leave-one-out evaluation "
            "needs at least 2 labelled slides in the index (keys are slide ids)"
        )
    return out


def _kin(labelled: Mapping[str, Any], patients: Mapping[str, str] | None) -> dict[str, set[str]]:
    """Slide id -> the labelled slides left out when it is the query: itself, and with
    ``patients`` every slide of its patient."""
    if not patients:
        return {sid: {sid} for sid in labelled}
    of = {sid: patients.get(sid, sid) for sid in labelled}
    return {sid: {s for s in labelled if of[s] == of[sid]} for sid in labelled}


def _vote(ranked: list[Any]) -> Any:
    counts = Counter(ranked)
    top = max(counts.values())
    tied = {lab for lab, c in counts.items() if c == top}
    return next(lab for lab in ranked if lab in tied)


def majority_vote(
    index: SearchIndex,
    labels: Mapping[str, Any],
    *,
    k: int = 5,
    mosaic_tiles: int = 64,
    seed: int = 0,
    patients: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Leave-one-slide-out (or, with ``patients``, leave-one-patient-out) majority-vote
    accuracy of the top ``k`` retrieved slides (mMV@k).

    Args:
        index: the index to evaluate.
        labels: slide id -> label; slides not in the index are ignored.
        k: retrieved slides that vote.
        mosaic_tiles: tiles representing each query slide.
        patients: slide id -> patient; the query's patient's slides never vote.

    Returns:
        ``{"k", "n_slides", "mmv", "accuracy", "per_class", "per_slide", "left_out"}``
        (``left_out``: "patient" or "slide").
    """
    from wsi_ssl.search.ranking import rank
    from wsi_ssl.search.searching import DEFAULT_HITS_PER_TILE

    labelled = _labelled(index, labels)
    kin = _kin(labelled, patients)
    number = {s.slide_id: s.number for s in index.slides}
    per_slide = []
    n_all = len(index.slides)
    for sid, label in labelled.items():
        query = index.query_slide(sid, max_tiles=mosaic_tiles, seed=seed)
        left_out = sorted(number[s] for s in kin[sid])  # left out of the search itself, so
        # a re-scan's tiles cannot use up the other slides' hits
        sims, ids = index.neighbours(query, "slides", max(DEFAULT_HITS_PER_TILE, n_all), left_out)
        hits = rank(query, "slides", sims, ids, index.entries, index.coords, n_all)
        ranked = [labelled[h.slide_id] for h in hits if h.slide_id in labelled][:k]
        predicted = _vote(ranked) if ranked else None
        per_slide.append(
            {"slide_id": sid, "label": label, "predicted": predicted, "retrieved": ranked}
        )
    per_class: dict[str, float] = {}
    for label in sorted({str(v) for v in labelled.values()}):
        rows = [p for p in per_slide if str(p["label"]) == label]
        per_class[label] = float(np.mean([p["predicted"] == p["label"] for p in rows]))
    return {
        "k": k,
        "n_slides": len(per_slide),
        "mmv": float(np.mean(list(per_class.values()))),
        "accuracy": float(np.mean([p["predicted"] == p["label"] for p in per_slide])),
        "per_class": per_class,
        "per_slide": per_slide,
        "left_out": "patient" if patients else "slide",
    }


def precision_at_k(
    index: SearchIndex,
    labels: Mapping[str, Any],
    *,
    k: int = 10,
    tiles_per_slide: int = 32,
    seed: int = 0,
    patients: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Precision@k of tile retrieval across slides (see the module docstring); with
    ``patients`` (slide id -> patient) the query's patient's slides are never retrieved.

    Returns:
        ``{"k", "queries", "precision", "macro_precision", "per_class", "per_slide"}``;
        ``per_slide`` maps each labelled slide id to ``{"queries", "precision"}`` (its query
        tiles and their mean precision), for intervals resampled over slides.
    """
    from wsi_ssl.storage import open_store
    from wsi_ssl.storage.embeddings import read_embeddings

    labelled = _labelled(index, labels)
    kin = _kin(labelled, patients)
    archive = open_store(index.root)
    number = {s.slide_id: s.number for s in index.slides}
    number_label = {s.number: labelled[s.slide_id] for s in index.slides if s.slide_id in labelled}
    unlabelled = [s.number for s in index.slides if s.slide_id not in labelled]
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {}
    per_slide: dict[str, dict[str, Any]] = {}
    for sid, label in labelled.items():
        entry = index.resolve_slide(sid)
        emb = read_embeddings(archive.slide(sid), index.encoder_id).embedded_only()
        feats = np.asarray(emb.features)
        rows = rng.choice(len(feats), size=min(tiles_per_slide, len(feats)), replace=False)
        left_out = {entry.number, *(number[s] for s in kin[sid])}
        _, ids = index.search_vectors(
            feats[np.sort(rows)], k, exclude_slides=[*sorted(left_out), *unlabelled]
        )
        mine = []
        for row in ids:
            slides, _ = decode_ids(row[row >= 0])
            got = [number_label[int(s)] == label for s in slides if int(s) in number_label]
            mine.append(float(np.mean(got)) if got else 0.0)
        scores.setdefault(str(label), []).extend(mine)
        per_slide[sid] = {"queries": len(mine), "precision": float(np.mean(mine))}
    flat = [v for vs in scores.values() for v in vs]
    per_class = {lab: float(np.mean(v)) for lab, v in sorted(scores.items())}
    return {
        "k": k,
        "queries": len(flat),
        "precision": float(np.mean(flat)),
        "macro_precision": float(np.mean(list(per_class.values()))),
        "per_class": per_class,
        "per_slide": per_slide,
    }


def recall_at_k(
    index: SearchIndex,
    queries: np.ndarray | None = None,
    *,
    k: int = 10,
    n_queries: int = 256,
    exact: SearchIndex | None = None,
    seed: int = 1,
) -> dict[str, Any]:
    """Recall@k of ``index`` against exact search over the same vectors.

    Args:
        queries: (Q, D) query vectors (default: ``n_queries`` indexed vectors, each query's
            own id then left out of both answers).
        exact: an exact (flat) index of the same archive to compare against (default: a
            streamed brute-force search over the index's slides' embeddings).

    Returns:
        ``{"k", "queries", "recall", "promised_recall", "kind"}``.

    Raises:
        EmbeddingsCorruptError: an indexed slide's embeddings cannot be read.
    """
    from wsi_ssl.storage import open_store

    source = ArchiveSource.of_entries(
        open_store(index.root), index.slides, index.encoder_id, index.dim
    )
    own = None
    if queries is None:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(source.n, size=min(n_queries, source.n), replace=False))
        own, queries = gather(source, rows)
    depth = 2 * k + 1
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if exact is not None:
        gt_sims, gt_ids = exact.search_vectors(queries, depth)
    else:
        gt_sims, gt_ids = exact_neighbours(source, normalise(queries), depth)
    if source.unreadable:  # the ground truth would lack an indexed slide's vectors
        raise next(iter(source.unreadable.values()))
    _, found = index.search_vectors(queries, k + (1 if own is not None else 0))
    return {
        "k": k,
        "queries": len(queries),
        "recall": tie_aware_recall(found, gt_sims, gt_ids, k, own),
        "promised_recall": index.promised_recall,
        "kind": index.kind,
    }
