"""Cross-validated probes on frozen features: folds fixed once per task, out-of-fold labels.

* k-NN: cosine similarity, ``k`` neighbours voting with weights 1 / distance (scikit-learn;
  weighted like DINO's k-NN evaluation, so that a ``k`` near the training set's size does not
  degrade to the class prior);
* linear probe: multinomial logistic regression on standardised features.

Folds are a function of the labels, the groups (slides, for tiles) and the seed only, so every
encoder is scored on the same splits. A slide's tiles are never split between training and
test: with fewer slides than folds, each slide is a fold of its own (leave-one-slide-out).
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["assign_folds", "knn_predictions", "linear_predictions", "split_digest"]


def assign_folds(
    y: np.ndarray, n_folds: int, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, str | None]:
    """The fold of every item (stratified) and a note when the split had to be coarser than
    asked. With ``groups`` (the slide of each tile) a group is never split across folds: with
    fewer groups than folds, each group is its own fold (leave-one-slide-out).

    Raises:
        ConfigError: ``groups`` holds fewer than 2 groups (no split keeps them apart).
    """
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    smallest = int(np.bincount(y).min(where=np.bincount(y) > 0, initial=len(y)))
    n = max(2, min(n_folds, smallest))
    note = f"{n} folds (the smallest class has {smallest} items)" if n < n_folds else None
    if groups is not None:
        return _grouped_folds(y, np.asarray(groups), n_folds, n, seed, note)
    folds = np.empty(len(y), dtype=np.int64)
    for f, (_, test) in enumerate(
        StratifiedKFold(n_splits=n, shuffle=True, random_state=seed).split(y, y)
    ):
        folds[test] = f
    return folds, note


def _grouped_folds(
    y: np.ndarray, groups: np.ndarray, asked: int, n: int, seed: int, note: str | None
) -> tuple[np.ndarray, str | None]:
    """Folds that keep every group (slide) on one side of each split."""
    from sklearn.model_selection import StratifiedGroupKFold

    from wsi_ssl.errors import ConfigError

    names, group_of = np.unique(groups, return_inverse=True)
    if len(names) < 2:
        raise ConfigError(
            f"the labelled tiles lie on {len(names)} slide; tile probes never train and test on "
            "the same slide, so label tiles on at least 2 slides"
        )
    if len(names) <= n:  # leave one slide out: each slide its own fold
        if len(names) < asked:
            note = f"{len(names)} folds, leave-one-slide-out ({len(names)} slides, {asked} folds asked)"
        return group_of.astype(np.int64), note
    folds = np.empty(len(y), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the least populated class has only ..." notes
        for f, (_, test) in enumerate(splitter.split(y, y, group_of)):
            folds[test] = f
    return np.unique(folds, return_inverse=True)[1].astype(np.int64), note  # no empty fold


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
        if len(np.unique(y[train])) < 2:  # one class to learn (a held-out slide had the other)
            out[test] = y[train][0]
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence notes on tiny or constant features
            probe.fit(x[train], y[train])
        out[test] = probe.predict(x[test])
    return out
