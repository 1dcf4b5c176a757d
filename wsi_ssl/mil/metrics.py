"""Slide-level classification metrics: AUC (one-vs-rest for several classes), balanced
accuracy, F1 and the confusion matrix, plus the ROC plot.

Computed from the confusion matrix directly so that folds lacking a class give defined values
(or None for an AUC that does not exist) instead of warnings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["classification_metrics", "confusion", "plot_roc", "roc_auc"]


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``m[i, j]``: slides of true class i predicted as class j."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return m


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> tuple[float | None, list[float | None]]:
    """Binary: AUC of the last class's probability. Several classes: the macro mean of the
    one-vs-rest AUCs of the classes present (and absent) in ``y_true``; per-class values are
    None for a class that is absent or alone."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true, int)
    n_classes = probs.shape[1]
    per: list[float | None] = []
    for c in range(n_classes):
        pos = y_true == c
        per.append(float(roc_auc_score(pos, probs[:, c])) if 0 < pos.sum() < len(pos) else None)
    if n_classes == 2:
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
        last class; several classes: macro over the classes present or predicted),
        ``f1_per_class`` and ``confusion_matrix`` (rows true, columns predicted).
    """
    y_true = np.asarray(y_true, int)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    y_pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, int)
    m = confusion(y_true, y_pred, n_classes)
    support, predicted, tp = m.sum(axis=1), m.sum(axis=0), np.diag(m)
    recall = np.divide(tp, support, out=np.zeros(n_classes), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(n_classes), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n_classes), where=denom > 0)
    seen = (support > 0) | (predicted > 0)
    auc, auc_per = roc_auc(y_true, probs) if len(y_true) else (None, [None] * n_classes)
    return {
        "n": len(y_true),
        "auc": auc,
        "auc_per_class": dict(zip(classes, auc_per, strict=True)),
        "accuracy": float(tp.sum() / max(1, len(y_true))),
        "balanced_accuracy": float(recall[support > 0].mean()) if (support > 0).any() else None,
        "f1": float(f1[1]) if n_classes == 2 else (float(f1[seen].mean()) if seen.any() else None),
        "f1_per_class": dict(zip(classes, (float(v) for v in f1), strict=True)),
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
