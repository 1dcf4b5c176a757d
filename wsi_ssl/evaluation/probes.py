"""Cross-validated probes on frozen features: folds fixed once per task, out-of-fold labels.

* k-NN: cosine similarity, ``k`` neighbours voting with weights 1 / distance (scikit-learn;
  weighted like DINO's k-NN evaluation, so that a ``k`` near the training set's size does not
  degrade to the class prior);
* linear probe: multinomial logistic regression on standardised features.

Folds are a function of the labels, the groups (slides, for tiles) and the seed only, so every
encoder is scored on the same splits.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["assign_folds", "knn_predictions", "linear_predictions", "split_digest"]


def assign_folds(
    y: np.ndarray, n_folds: int, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, str | None]:
    """The fold of every item (stratified; grouped when ``groups`` has enough groups) and a
    note when the split had to be coarser than asked."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(y)
    smallest = int(np.bincount(y).min(where=np.bincount(y) > 0, initial=len(y)))
    n = max(2, min(n_folds, smallest))
    note = f"{n} folds (the smallest class has {smallest} items)" if n < n_folds else None
    folds = np.empty(len(y), dtype=np.int64)
    if groups is not None and len(np.unique(groups)) >= n:
        splitter = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the least populated class has only ..." notes
            for f, (_, test) in enumerate(splitter.split(y, y, groups)):
                folds[test] = f
        return folds, note
    if groups is not None:
        note = "tile folds not grouped by slide (fewer slides than folds)"
    for f, (_, test) in enumerate(
        StratifiedKFold(n_splits=n, shuffle=True, random_state=seed).split(y, y)
    ):
        folds[test] = f
    return folds, note


def split_digest(folds: np.ndarray) -> str:
    """A short hash of a fold assignment (equal digests: equal splits)."""
    import hashlib

    return hashlib.sha256(np.asarray(folds, dtype=np.int64).tobytes()).hexdigest()[:16]


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predictions(feats: np.ndarray, y: np.ndarray, folds: np.ndarray, k: int) -> np.ndarray:
    """Out-of-fold k-NN class of every item (k capped at the training fold's size)."""
    from sklearn.neighbors import KNeighborsClassifier

    x = _normalised(feats)
    out = np.empty(len(y), dtype=np.int64)
    for f in np.unique(folds):
        test, train = folds == f, folds != f
        knn = KNeighborsClassifier(
            n_neighbors=max(1, min(k, int(train.sum()))), metric="cosine", weights="distance"
        )
        knn.fit(x[train], y[train])
        out[test] = knn.predict(x[test])
    return out


def linear_predictions(
    feats: np.ndarray, y: np.ndarray, folds: np.ndarray, seed: int
) -> np.ndarray:
    """Out-of-fold class of every item from a logistic-regression probe per fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(feats, dtype=np.float32)
    out = np.empty(len(y), dtype=np.int64)
    for f in np.unique(folds):
        test, train = folds == f, folds != f
        probe = make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence notes on tiny or constant features
            probe.fit(x[train], y[train])
        out[test] = probe.predict(x[test])
    return out
