"""Stratified k-fold splits that keep each patient's slides in one fold.

Patients (not slides) are dealt to folds class by class, rarest class first, each to the fold
that has the fewest patients of that class so far (ties: the fewest slides, then the lowest
fold number), in a seeded random order. Every fold therefore gets ``⌊n_c / k⌋`` or
``⌈n_c / k⌉`` patients of each class ``c`` and no patient is ever in two folds — the
patient-level splitting the field requires so that slides of one patient never sit on both
sides of an evaluation.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

__all__ = ["assign_folds", "patient_labels"]


def patient_labels(labels: Sequence[int], groups: Sequence[str]) -> dict[str, int]:
    """Each patient's label for stratification: the most common label of its slides (ties:
    the lower class index)."""
    per: dict[str, Counter[int]] = defaultdict(Counter)
    for y, g in zip(labels, groups, strict=True):
        per[g][int(y)] += 1
    return {g: min(c, key=lambda y: (-c[y], y)) for g, c in per.items()}


def assign_folds(
    labels: Sequence[int], groups: Sequence[str] | None, n_folds: int, seed: int = 0
) -> np.ndarray:
    """The fold (0 .. n_folds-1) of every sample.

    Args:
        labels: class index of each sample (slide).
        groups: patient of each sample; None: every slide is its own patient.
        n_folds: number of folds (>= 2).
        seed: seeds the order patients are dealt in.

    Returns:
        int64 array of fold numbers, aligned with ``labels``.
    """
    labels = [int(y) for y in labels]
    groups = [str(i) for i in range(len(labels))] if groups is None else [str(g) for g in groups]
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    rng = np.random.default_rng(seed)
    plabel = patient_labels(labels, groups)
    size = Counter(groups)
    by_class: dict[int, list[str]] = defaultdict(list)
    for g in sorted(plabel):
        by_class[plabel[g]].append(g)
    per_class = np.zeros((max(by_class) + 1, n_folds), dtype=np.int64)
    slides = np.zeros(n_folds, dtype=np.int64)
    fold_of: dict[str, int] = {}
    for c in sorted(by_class, key=lambda c: (len(by_class[c]), c)):
        patients = by_class[c]
        for i in rng.permutation(len(patients)):
            g = patients[i]
            f = min(range(n_folds), key=lambda f: (per_class[c, f], slides[f], f))
            fold_of[g] = f
            per_class[c, f] += 1
            slides[f] += size[g]
    return np.array([fold_of[g] for g in groups], dtype=np.int64)
