"""Metrics and paired bootstrap confidence intervals.

Every encoder on a task is scored on the same items, and the bootstrap resamples are drawn
once per task (stratified by class, so every resample holds every class), so intervals are
comparable and the difference between two encoders can be bootstrapped pairwise: the
difference "exceeds the intervals" when its own percentile interval excludes 0. Items that
are not independent (the tiles of a slide, the slides of a patient) are resampled as whole
clusters (:func:`cluster_bootstrap_indices`). The metrics
themselves are MIL's (:mod:`wsi_ssl.mil.metrics`), so both score alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from wsi_ssl.mil.metrics import balanced_accuracy, macro_f1, roc_auc

__all__ = [
    "METRICS",
    "Estimate",
    "auc",
    "balanced_accuracy",
    "bootstrap_indices",
    "cluster_bootstrap_indices",
    "estimate",
    "macro_f1",
    "paired_difference",
    "pooled_mean",
]

Metric = Callable[[np.ndarray, np.ndarray], float]
Resamples = np.ndarray | Sequence[np.ndarray]
"""Bootstrap resamples: rows of item indices (equal lengths or not)."""


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
    class (so every resample holds each of those classes)."""
    y = np.asarray(y)
    _, cluster_of = np.unique(np.asarray(clusters), return_inverse=True)
    members = [np.flatnonzero(cluster_of == c) for c in range(int(cluster_of.max()) + 1)]
    dominant = np.array([np.bincount(y[m]).argmax() for m in members])
    rng = np.random.default_rng(seed)
    drawn = np.empty((n, len(members)), dtype=np.int64)
    for c in np.unique(dominant):
        pool = np.flatnonzero(dominant == c)
        drawn[:, pool] = rng.choice(pool, size=(n, len(pool)), replace=True)
    return [np.concatenate([members[c] for c in row]) for row in drawn]


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
