"""Metrics and paired bootstrap confidence intervals.

Every encoder on a task is scored on the same items, and the bootstrap resamples are drawn
once per task (stratified by class, so every resample holds every class), so intervals are
comparable and the difference between two encoders can be bootstrapped pairwise: the
difference "exceeds the intervals" when its own percentile interval excludes 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "METRICS",
    "Estimate",
    "auc",
    "balanced_accuracy",
    "bootstrap_indices",
    "estimate",
    "macro_f1",
    "paired_difference",
    "pooled_mean",
]

Metric = Callable[[np.ndarray, np.ndarray], float]


def _confusion(y: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """``m[i, j]``: items of class i predicted as j; a prediction that is no class of ``y``
    (e.g. -1 for "none") counts in an extra column."""
    y = np.asarray(y, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    n = int(max(y.max(initial=0), predicted.max(initial=0))) + 2
    predicted = np.where(predicted < 0, n - 1, predicted)
    return np.bincount(y * n + predicted, minlength=n * n).reshape(n, n)


def balanced_accuracy(y: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (a prediction outside them is wrong)."""
    m = _confusion(y, predicted)
    support = m.sum(axis=1)
    present = support > 0
    return float((np.diag(m)[present] / support[present]).mean())


def macro_f1(y: np.ndarray, predicted: np.ndarray) -> float:
    """F1 averaged over the classes present in ``y`` (0 for a class never predicted right)."""
    m = _confusion(y, predicted)
    support, tp = m.sum(axis=1), np.diag(m)
    present = support > 0
    denominator = support + m.sum(axis=0)  # 2 tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros(len(m)), where=denominator > 0)
    return float(f1[present].mean())


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(score)  # ties get their mean rank: the Mann-Whitney U statistic
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(y: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC AUC (as :func:`wsi_ssl.mil.metrics.roc_auc`): two classes, of the last class's
    probability; more, the macro mean of the one-vs-rest AUCs that exist (nan if none)."""
    y = np.asarray(y)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape[1] == 2:
        value = _binary_auc(y == 1, probabilities[:, 1])
        return float("nan") if value is None else value
    per = [_binary_auc(y == c, probabilities[:, c]) for c in range(probabilities.shape[1])]
    defined = [a for a in per if a is not None]
    return float(np.mean(defined)) if defined else float("nan")


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


def _interval(values: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    values = values[np.isfinite(values)]
    if not len(values):
        return None, None
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def estimate(
    metric: Metric, y: np.ndarray, output: np.ndarray, resamples: np.ndarray, confidence: float
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
    resamples: np.ndarray,
    confidence: float,
) -> Estimate:
    """``metric(first) - metric(second)`` on the same items, with a paired bootstrap interval."""
    value = metric(y, first) - metric(y, second)
    if not len(resamples):
        return Estimate(value, None, None)
    boot = np.array([metric(y[r], first[r]) - metric(y[r], second[r]) for r in resamples])
    low, high = _interval(boot, confidence)
    return Estimate(value, low, high)
