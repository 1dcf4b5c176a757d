"""The cross-validation split: each slide's test fold, and per fold a patient-disjoint
validation split carved out of the other folds (for early stopping)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from wsi_ssl.errors import LabelsError
from wsi_ssl.mil.config import MILConfig
from wsi_ssl.mil.learners import FoldSplit
from wsi_ssl.mil.matching import MatchReport
from wsi_ssl.mil.splits import assign_folds

__all__ = ["fold_splits", "folds_from_table", "inner_split"]


def folds_from_table(report: MatchReport, config: MILConfig, seed: int) -> tuple[np.ndarray, str]:
    """The test fold of every slide: the CSV's ``fold`` column ("csv") or a generated,
    patient-grouped, stratified split ("generated").

    Raises:
        LabelsError: a single fold value, or a class with fewer patients than folds.
    """
    slides = report.slides
    if any(s.fold is not None for s in slides):
        values = sorted({s.fold for s in slides if s.fold is not None})
        if len(values) < 2:
            raise LabelsError(report.labels_path, "the slides left have a single 'fold' value")
        # read_labels gives every slide a fold once the column is there: no fold is None here
        index: dict[int | None, int] = {v: i for i, v in enumerate(values)}
        return np.array([index[s.fold] for s in slides], dtype=np.int64), "csv"
    y = [s.y for s in slides]
    groups = [s.patient for s in slides]
    counts = {c: len({s.patient for s in slides if s.y == i}) for i, c in enumerate(report.classes)}
    rare, n_rare = min(counts.items(), key=lambda kv: kv[1])
    if n_rare < config.folds:
        raise LabelsError(
            report.labels_path,
            f"class {rare!r} has {n_rare} patient(s), fewer than folds={config.folds}; "
            + (
                f"use folds={n_rare} or fewer"
                if n_rare >= 2
                else "cross-validation needs 2 per class: label more slides of it"
            ),
            [s.line for s in slides if s.label == rare],
            parameters=("folds",),
        )
    return assign_folds(y, groups, config.folds, seed), "generated"


def inner_split(
    y: np.ndarray, groups: list[str], classes: list[str], val_fraction: float, seed: int
) -> tuple[np.ndarray | None, str | None]:
    """A validation mask over the training slides, or None and why there is none. The split
    holds every class: with fewer patients holding a class (a patient holds each class among
    its slides, as :func:`~wsi_ssl.mil.splits.assign_folds` counts) than ``1 / val_fraction``
    parts it takes one of them per class (a one-class validation split picked the epoch by one
    slide's loss)."""
    if val_fraction == 0:
        return None, "val_fraction is 0: trained every epoch, no early stopping"
    per_class = [
        len({g for g, v in zip(groups, y, strict=True) if v == c}) for c in range(len(classes))
    ]
    low = [classes[c] for c, n in enumerate(per_class) if n < 2]
    if low:
        return None, (
            f"fewer than 2 training patients of class {', '.join(map(repr, low))}: no "
            "validation split, trained every epoch without early stopping"
        )
    wanted = max(2, round(1 / val_fraction))
    # patients are counted for every class among their slides, as the folds deal them: no more
    # parts than patients holding any one class, so that the validation part holds each class
    n_parts = min(wanted, *per_class)
    if n_parts < min(wanted, 3):
        rare = classes[int(np.argmin(per_class))]
        return None, (
            f"only {min(per_class)} training patients of class {rare!r}: a validation split "
            f"holding every class would take 1/{max(1, n_parts)} of them; trained every epoch "
            "without early stopping"
        )
    parts = assign_folds(y.tolist(), groups, n_parts, seed)
    every = set(range(len(classes)))
    # part 0, or where that lacks a class (about 1 in 1,500 random cohorts of mixed patients)
    # the first part that holds every class and leaves every class to train on
    val = next((q for q in range(n_parts) if set(y[parts == q]) == every == set(y[parts != q])), 0)
    return parts == val, None


def fold_splits(report: MatchReport, folds: np.ndarray, config: MILConfig) -> Iterator[FoldSplit]:
    """Every fold's test, train and validation rows, in fold order.

    Raises:
        LabelsError: a fold's training slides hold a single class.
    """
    slides = report.slides
    y = np.array([s.y for s in slides], dtype=np.int64)
    for f in range(int(folds.max()) + 1):
        seed = config.seed + f
        test = np.flatnonzero(folds == f)
        rest = np.flatnonzero(folds != f)
        val_mask, note = inner_split(
            y[rest], [slides[i].patient for i in rest], report.classes, config.val_fraction, seed
        )
        val = rest[val_mask] if val_mask is not None else np.zeros(0, np.int64)
        train = rest[~val_mask] if val_mask is not None else rest
        if len(set(y[train].tolist())) < 2:
            raise LabelsError(
                report.labels_path,
                f"fold {f}: the training slides hold a single class; "
                + (
                    "assign the labels' 'fold' column so every fold's other folds hold each class"
                    if any(s.fold is not None for s in slides)
                    else "use fewer folds"
                ),
            )
        yield FoldSplit(f, seed, test, rest, train, val, note)
