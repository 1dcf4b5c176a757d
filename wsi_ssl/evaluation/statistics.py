"""Metrics and paired bootstrap confidence intervals.

Every encoder on a task is scored on the same items, and the bootstrap resamples are drawn
once per task (stratified by class, so every resample holds every class), so intervals are
comparable and the difference between two encoders can be bootstrapped pairwise: the
difference "exceeds the intervals" when its own percentile interval excludes 0. Items that
are not independent (the tiles of a slide, the slides of a patient) are resampled as whole
clusters (:func:`cluster_bootstrap_indices`). The metrics
themselves are MIL's (:mod:`wsi_ssl.mil.metrics`), so both score alike.

A bootstrap over a handful of clusters says little and, with one cluster per class, nothing
at all (a stratum of one slide redraws itself, so every resample is the same and the
"interval" is a point). :func:`draw_resamples` therefore gives no resamples, and the reason,
unless every class is in at least :data:`MIN_CLUSTERS_PER_CLASS` clusters; with no resamples
there is no interval and no claim that a difference exceeds one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from wsi_ssl.listing import first_few
from wsi_ssl.mil.metrics import balanced_accuracy, macro_f1, roc_auc

__all__ = [
    "METRICS",
    "MIN_CLUSTERS_PER_CLASS",
    "Estimate",
    "auc",
    "balanced_accuracy",
    "bootstrap_indices",
    "cluster_bootstrap_indices",
    "draw_resamples",
    "estimate",
    "macro_f1",
    "paired_difference",
    "pooled_mean",
    "too_few_clusters",
]

Metric = Callable[[np.ndarray, np.ndarray], float]
Resamples = np.ndarray | Sequence[np.ndarray]
"""Bootstrap resamples: rows of item indices (equal lengths or not)."""

MIN_CLUSTERS_PER_CLASS = 3
"""The fewest clusters (slides, patients, or images for patch tasks) that must hold each
class for a task to get bootstrap intervals: with fewer, the resamples hardly differ (two
slides give three distinct resamples) and the interval would look far surer than it is."""


def auc(y: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC AUC (:func:`wsi_ssl.mil.metrics.roc_auc`): two classes, of the last class's
    probability; more, the macro mean of the one-vs-rest AUCs that exist (nan if none)."""
    value, _ = roc_auc(y, probabilities)
    return math.nan if value is None else value


def pooled_mean(y: np.ndarray, totals: np.ndarray) -> float:
    """The mean over every pooled observation of some items: ``totals`` is (N, 2), each item's
    sum and count (e.g. a slide's summed precision over its query tiles, and their number),
    so resampling items resamples their observations with them (``y`` is not used)."""
    totals = np.asarray(totals, dtype=np.float64)
    count = totals[:, 1].sum()
    return float(totals[:, 0].sum() / count) if count > 0 else float("nan")


METRICS: dict[str, Metric] = {
    "balanced_accuracy": balanced_accuracy,
    "macro_f1": macro_f1,
    "auc": auc,
}


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its bootstrap interval (None without resamples)."""

    value: float
    low: float | None
    high: float | None


def bootstrap_indices(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(n, len(y)) resampled item indices, drawn with replacement within each class."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    out = np.empty((n, len(y)), dtype=np.int64)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        out[:, members] = rng.choice(members, size=(n, len(members)), replace=True)
    return out


def cluster_bootstrap_indices(
    y: np.ndarray, clusters: np.ndarray, n: int, seed: int
) -> list[np.ndarray]:
    """n resamples of whole clusters (e.g. the slide of each tile): each is the item indices
    of clusters drawn with replacement, within strata of clusters sharing their most frequent
    class (so every resample holds each of those classes). When a stratum has fewer than 2
    clusters (it would redraw itself every time), all clusters are drawn together instead."""
    y = np.asarray(y)
    _, cluster_of = np.unique(np.asarray(clusters), return_inverse=True)
    members = [np.flatnonzero(cluster_of == c) for c in range(int(cluster_of.max()) + 1)]
    dominant = np.array([np.bincount(y[m]).argmax() for m in members])
    if min(Counter(dominant.tolist()).values()) < 2:
        dominant = np.zeros_like(dominant)  # one stratum: every cluster drawn from all
    rng = np.random.default_rng(seed)
    drawn = np.empty((n, len(members)), dtype=np.int64)
    for c in np.unique(dominant):
        pool = np.flatnonzero(dominant == c)
        drawn[:, pool] = rng.choice(pool, size=(n, len(pool)), replace=True)
    return [np.concatenate([members[c] for c in row]) for row in drawn]


def too_few_clusters(
    y: np.ndarray, clusters: np.ndarray, classes: Sequence[str], unit: str
) -> str | None:
    """Why a bootstrap over ``clusters`` (the cluster of each item; ``unit`` names one, e.g.
    "slide") gives no meaningful interval: a class in fewer than
    :data:`MIN_CLUSTERS_PER_CLASS` clusters. None when every class is in enough of them."""
    y, clusters = np.asarray(y), np.asarray(clusters)
    held = {int(c): len(np.unique(clusters[y == c])) for c in np.unique(y)}
    short = {c: k for c, k in held.items() if k < MIN_CLUSTERS_PER_CLASS}
    if not short:
        return None
    shown = first_few((f"{classes[c]!r} is in {k}" for c, k in short.items()), 5)
    return f"they need every class in at least {MIN_CLUSTERS_PER_CLASS} {unit}s: {shown}"


def draw_resamples(
    y: np.ndarray,
    clusters: np.ndarray | None,
    classes: Sequence[str],
    unit: str,
    n: int,
    seed: int,
) -> tuple[Resamples, str | None]:
    """The task's ``n`` bootstrap resamples and, when it gets none though some were asked
    for, why (:func:`too_few_clusters`). ``clusters`` None: every item is its own cluster
    (drawn by :func:`bootstrap_indices`), else whole clusters (:func:`cluster_bootstrap_indices`)."""
    if n == 0:
        return [], None
    own = np.arange(len(y)) if clusters is None else clusters
    reason = too_few_clusters(y, own, classes, unit)
    if reason is not None:
        return [], reason
    if clusters is None:
        return bootstrap_indices(y, n, seed), None
    return cluster_bootstrap_indices(y, clusters, n, seed), None


def _interval(values: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    values = values[np.isfinite(values)]
    if not len(values):
        return None, None
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def estimate(
    metric: Metric, y: np.ndarray, output: np.ndarray, resamples: Resamples, confidence: float
) -> Estimate:
    """``metric(y, output)`` and its percentile interval over ``resamples`` (rows of indices)."""
    value = metric(y, output)
    if not len(resamples):
        return Estimate(value, None, None)
    boot = np.array([metric(y[r], output[r]) for r in resamples])
    low, high = _interval(boot, confidence)
    return Estimate(value, low, high)


def paired_difference(
    metric: Metric,
    y: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    resamples: Resamples,
    confidence: float,
) -> Estimate:
    """``metric(first) - metric(second)`` on the same items, with a paired bootstrap interval."""
    value = metric(y, first) - metric(y, second)
    if not len(resamples):
        return Estimate(value, None, None)
    boot = np.array([metric(y[r], first[r]) - metric(y[r], second[r]) for r in resamples])
    low, high = _interval(boot, confidence)
    return Estimate(value, low, high)
