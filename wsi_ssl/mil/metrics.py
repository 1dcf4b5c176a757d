"""Slide-level classification metrics: AUC (one-vs-rest for several classes), balanced
accuracy, F1 and the confusion matrix, plus the ROC plot.

Computed from the confusion matrix directly so that folds lacking a class give defined values
instead of warnings, or None where a fold cannot measure one, left out of the folds' mean: the
AUC, and the F1 of a class no slide of the fold belongs to (scikit-learn scores it 0, by
``zero_division=0`` or from false positives, which a fold without tumour would average in).
Macro-F1 over several classes is scikit-learn's (the classes present or predicted). The
evaluation harness scores its probes with the same functions
(:mod:`wsi_ssl.evaluation.statistics`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "balanced_accuracy",
    "binary_auc",
    "classification_metrics",
    "confusion",
    "macro_f1",
    "plot_roc",
    "roc_auc",
]


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``m[i, j]``: slides of true class i predicted as class j."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return m


def _counts(y: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """:func:`confusion` over the classes seen, with a last column for predictions that are
    no class (negative, e.g. -1 for "nothing retrieved")."""
    y = np.asarray(y, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    n = int(max(y.max(initial=0), predicted.max(initial=0))) + 2
    predicted = np.where(predicted < 0, n - 1, predicted)
    return np.bincount(y * n + predicted, minlength=n * n).reshape(n, n)


def _class_f1(m: np.ndarray) -> np.ndarray:
    """Each class's F1 = 2 tp / (2 tp + fp + fn) from a confusion matrix (0 when undefined)."""
    tp, denominator = np.diag(m), m.sum(axis=1) + m.sum(axis=0)
    return np.divide(2 * tp, denominator, out=np.zeros(len(m)), where=denominator > 0)


def balanced_accuracy(y: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (a prediction that is no class is wrong);
    nan for no items."""
    m = _counts(y, predicted)
    support = m.sum(axis=1)
    present = support > 0
    return float((np.diag(m)[present] / support[present]).mean()) if present.any() else math.nan


def macro_f1(y: np.ndarray, predicted: np.ndarray) -> float:
    """F1 averaged over the classes present in ``y`` or predicted (scikit-learn's
    ``average="macro"``); a prediction that is no class is wrong; nan for no items."""
    m = _counts(y, predicted)  # its last column (and empty last row): no class
    seen = ((m.sum(axis=1) > 0) | (m.sum(axis=0) > 0))[:-1]
    return float(_class_f1(m)[:-1][seen].mean()) if seen.any() else math.nan


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC of ``score`` for the bool labels ``positive`` (the Mann-Whitney U statistic,
    ties at their mean rank); None when one side is empty."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> tuple[float | None, list[float | None]]:
    """Binary: AUC of the last class's probability. Several classes: the macro mean of the
    one-vs-rest AUCs of the classes present (and absent) in ``y_true``; per-class values are
    None for a class that is absent or alone."""
    y_true = np.asarray(y_true, int)
    probs = np.asarray(probs, dtype=np.float64)
    per = [binary_auc(y_true == c, probs[:, c]) for c in range(probs.shape[1])]
    if probs.shape[1] == 2:
        return per[1], per
    defined = [a for a in per if a is not None]
    return (float(np.mean(defined)) if defined else None), per


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Metrics of predicted class probabilities ``probs`` (n, C) against true indices.

    Returns:
        ``n``, ``auc`` (None when undefined), ``auc_per_class`` (one-vs-rest), ``accuracy``,
        ``balanced_accuracy`` (mean recall over the classes present), ``f1`` (binary: of the
        last class; several classes: :func:`macro_f1`), ``f1_per_class`` and
        ``confusion_matrix`` (rows true, columns predicted); None where there is no slide,
        and a class's F1 (the binary ``f1`` too) None where no slide is of that class, as
        its AUC.
    """
    y_true = np.asarray(y_true, int)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    y_pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, int)
    m = confusion(y_true, y_pred, n_classes)
    f1: list[float | None] = [
        float(v) if n else None for v, n in zip(_class_f1(m), m.sum(axis=1), strict=True)
    ]
    auc, auc_per = roc_auc(y_true, probs) if len(y_true) else (None, [None] * n_classes)
    some = len(y_true) > 0
    return {
        "n": len(y_true),
        "auc": auc,
        "auc_per_class": dict(zip(classes, auc_per, strict=True)),
        "accuracy": float(np.diag(m).sum() / max(1, len(y_true))),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred) if some else None,
        "f1": f1[1] if n_classes == 2 else (macro_f1(y_true, y_pred) if some else None),
        "f1_per_class": dict(zip(classes, f1, strict=True)),
        "confusion_matrix": m.tolist(),
    }


def plot_roc(
    out: str | Path,
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]],
    classes: Sequence[str],
    title: str,
) -> Path:
    """ROC curves as PNG. ``curves``: (name, y_true, probs) per fold plus the pooled one;
    binary tasks draw one curve per entry, several classes one one-vs-rest curve per class of
    the last (pooled) entry."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(5.5, 5), dpi=110)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls=":", c="0.6", lw=1)

    def draw(y: np.ndarray, score: np.ndarray, label: str, **style: Any) -> None:
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, score)
            auc, _ = roc_auc(y.astype(int), np.stack([1 - score, score], axis=1))
            ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})", **style)

    if len(classes) == 2:
        for i, (name, y, p) in enumerate(curves):
            last = i == len(curves) - 1
            draw(
                np.asarray(y) == 1,
                np.asarray(p)[:, 1],
                name,
                lw=2.2 if last else 1,
                c="k" if last else None,
                alpha=1 if last else 0.55,
            )
        ax.set_title(f"{title}\npositive class: {classes[1]}", fontsize=10)
    else:
        name, y, p = curves[-1]
        for c, cls in enumerate(classes):
            draw(np.asarray(y) == c, np.asarray(p)[:, c], f"{cls} vs rest", lw=1.6)
        ax.set_title(f"{title}\n{name}, one-vs-rest", fontsize=10)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
