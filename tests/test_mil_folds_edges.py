"""Folds of patients with slides of several classes, the metrics of a fold lacking a class,
and what the labels CSV and ``mil train --json`` say about it."""

from __future__ import annotations

import csv as csv_module
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from wsi_ssl.errors import LabelsError
from wsi_ssl.mil import train
from wsi_ssl.mil.cv import inner_split
from wsi_ssl.mil.labels import LabelTable, read_labels
from wsi_ssl.mil.metrics import classification_metrics
from wsi_ssl.mil.splits import assign_folds, patient_labels
from wsi_ssl.testing.bags import write_bag_store

ENC = "enc-x"
SMALL = {"hidden_dim": 8, "attention_dim": 4, "device": "cpu", "threads": 1}

# the walkthrough's cohort: P1, P2, P4, P6 have a tumour and a normal slide, P3, P5 normal only
PATIENTS = ["P1", "P1", "P2", "P2", "P3", "P4", "P4", "P5", "P6", "P6"]
TUMOUR = [1, 0, 0, 1, 0, 0, 1, 0, 0, 1]  # normal 0, tumour 1: 'normal' < 'tumour'


def _classes_per_fold(labels: list[int], folds: np.ndarray, k: int) -> list[set[int]]:
    return [set(np.asarray(labels)[folds == f].tolist()) for f in range(k)]


def test_every_test_fold_holds_the_class_that_mixed_patients_hold() -> None:
    """Dealt by their majority (ties to the lower index), the four mixed patients counted as
    'normal' and 39 of 200 seeds left a test fold without tumour; named so that tumour sorts
    first, none did. Now none does either way, and the folds are the same."""
    swapped = [1 - y for y in TUMOUR]
    for seed in range(200):
        folds = assign_folds(TUMOUR, PATIENTS, 3, seed)
        assert all(c == {0, 1} for c in _classes_per_fold(TUMOUR, folds, 3)), seed
        assert np.array_equal(folds, assign_folds(swapped, PATIENTS, 3, seed)), seed
    assert patient_labels(TUMOUR, PATIENTS) == {
        "P1": 1, "P2": 1, "P3": 0, "P4": 1, "P5": 0, "P6": 1,
    }  # fmt: skip


def _cohort(rng: np.random.Generator) -> tuple[list[int], list[str]]:
    """2-4 classes of unequal size; patients of 1-4 slides, a share of them mixed."""
    labels, groups = [], []
    n_classes = int(rng.integers(2, 5))
    mixed = rng.uniform(0, 0.6)
    share = rng.dirichlet(np.ones(n_classes))
    for p in range(int(rng.integers(4, 30))):
        y = int(rng.choice(n_classes, p=share))
        for _ in range(int(rng.integers(1, 5))):
            labels.append(y if rng.random() > mixed else int(rng.integers(0, n_classes)))
            groups.append(f"p{p}")
    return labels, groups


def test_every_fold_holds_every_class_as_many_patients_as_folds_hold() -> None:
    """Over random cohorts, a fold lacks a class only where fewer patients than folds hold it,
    and renaming the classes (permuting their indices) changes no fold. Before: 45 of these
    300 cohorts left a fold without such a class, and 149 changed folds when renamed."""
    rng = np.random.default_rng(11)
    for trial in range(300):
        labels, groups = _cohort(rng)
        k = int(rng.integers(2, 6))
        folds = assign_folds(labels, groups, k, trial)
        fold_of = {g: int(f) for g, f in zip(groups, folds, strict=True)}
        assert all(fold_of[g] == f for g, f in zip(groups, folds, strict=True))
        holders = Counter(c for c, _ in set(zip(labels, groups, strict=True)))
        every = {c for c, n in holders.items() if n >= k}
        assert all(every <= c for c in _classes_per_fold(labels, folds, k)), trial
        perm = np.random.default_rng(trial).permutation(max(labels) + 1)
        renamed = [int(perm[y]) for y in labels]
        assert np.array_equal(folds, assign_folds(renamed, groups, k, trial)), trial


@pytest.mark.parametrize("seed", range(20))
def test_folds_are_stratified_by_the_patients_holding_each_class(seed: int) -> None:
    """test_mil_splits' cohorts (a tenth of the slides of another class than their patient's
    others): per class, the patients holding it differ by at most 1 across folds."""
    from test_mil_splits import _random_cohort

    rng = np.random.default_rng(seed)
    labels, groups = _random_cohort(rng)
    k = int(rng.integers(2, 6))
    folds = assign_folds(labels, groups, k, seed=seed)
    pairs = set(zip(labels, groups, folds.tolist(), strict=True))
    for c in set(labels):
        per_fold = Counter(f for y, _, f in pairs if y == c)
        counts = [per_fold.get(f, 0) for f in range(k)]
        assert max(counts) - min(counts) <= 1, (c, counts)


def test_a_patient_is_dealt_by_the_rarest_class_it_holds() -> None:
    # a holds 0 and 1, b holds 0 and 2; class 0 is held by both, 2 has one slide, 1 two
    assert patient_labels([1, 1, 0, 0, 2], ["a", "a", "a", "b", "b"]) == {"a": 1, "b": 2}
    # classes held alike: by slides, not by index; then by the names of their patients
    assert patient_labels([0, 0, 1, 2, 2], ["a", "a", "a", "b", "b"]) == {"a": 1, "b": 2}
    assert patient_labels([1, 0, 0, 1], ["b", "b", "a", "a"]) == {"a": 0, "b": 0}


def test_the_validation_split_counts_patients_holding_each_class() -> None:
    """The walkthrough's fold: five training patients, four of them with a tumour slide.
    Before, counting majority labels, it said "only 0 training patients of class 'tumour'"
    and trained without early stopping."""
    train_rows = [i for i, g in enumerate(PATIENTS) if g != "P5"]
    y = np.array([TUMOUR[i] for i in train_rows])
    groups = [PATIENTS[i] for i in train_rows]
    for seed in range(20):
        val, note = inner_split(y, groups, ["normal", "tumour"], 0.34, seed)
        assert note is None and val is not None
        assert set(y[val].tolist()) == set(y[~val].tolist()) == {0, 1}
    # where the first part lacks a class, another one holding every class is taken
    y = np.array([2, 1, 1, 0, 0, 2, 0, 2, 1])
    groups = ["P0", "P0", "P1", "P1", "P2", "P2", "P3", "P3", "P3"]
    assert set(y[assign_folds(y.tolist(), groups, 3, 6) == 0].tolist()) != {0, 1, 2}
    val, note = inner_split(y, groups, ["a", "b", "c"], 1 / 3, 6)
    assert note is None and val is not None
    assert set(y[val].tolist()) == set(y[~val].tolist()) == {0, 1, 2}


def test_f1_of_a_fold_without_the_positive_class_is_none_like_its_auc() -> None:
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.8, 0.2]])  # one normal called tumour
    m = classification_metrics([0, 0, 0], probs, ["normal", "tumour"])
    assert m["auc"] is None and m["f1"] is None
    assert m["f1_per_class"] == {"normal": pytest.approx(0.8), "tumour": None}
    m = classification_metrics([0, 1, 0], probs, ["normal", "tumour"])
    assert m["f1"] == pytest.approx(1.0) and m["f1_per_class"]["normal"] == pytest.approx(1.0)


def _archive(root: Path, n: int) -> list[str]:
    rng = np.random.default_rng(2)
    ids = [f"{i:016x}" for i in range(n)]
    for i, sid in enumerate(ids):
        write_bag_store(root, sid, rng.normal(size=(6, 4)) + (i % 2), encoder_id=ENC)
    return ids


def test_a_fold_without_positives_is_left_out_of_the_mean_f1(tmp_path: Path) -> None:
    """Fold 0 holds only 'a' slides: its F1 is n/a and the folds' mean F1 is over 2 folds,
    as its AUC (before: F1 0.000, averaged in over 3 folds)."""
    ids = _archive(tmp_path / "archive", 9)
    fold = {0: 0, 2: 0, 4: 0, 1: 1, 3: 1, 6: 1, 5: 2, 7: 2, 8: 2}
    rows = [(ids[i], "ab"[i % 2], f) for i, f in fold.items()]
    csv = tmp_path / "labels.csv"
    csv.write_text("slide,label,fold\n" + "".join(f"{s},{y},{f}\n" for s, y, f in rows))
    result = train(
        tmp_path / "archive", csv, ENC, tmp_path / "run", epochs=1, val_fraction=0.0, **SMALL
    )
    fold0 = result.folds[0].test
    assert fold0["auc"] is None and fold0["f1"] is None
    assert fold0["f1_per_class"]["b"] is None
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["folds_mean_std"]["f1"]["n_folds"] == 2
    assert metrics["folds_mean_std"]["auc"]["n_folds"] == 2
    assert metrics["folds"][0]["test"]["f1"] is None
    line = next(s for s in result.lines() if s.startswith("fold 0:"))
    assert line.startswith("fold 0: 6 train / 0 val / 3 test slides") and "AUC n/a" in line
    assert line.endswith("F1 n/a")


def test_mixed_patients_train_with_early_stopping_and_tumour_in_every_fold(
    tmp_path: Path,
) -> None:
    """The walkthrough's cohort with --folds 3: every fold tests tumour slides, and a fold
    without early stopping names as many training patients with a tumour slide as it has
    (before: "only 0 training patients of class 'tumour'" on every fold)."""
    ids = _archive(tmp_path / "archive", 10)
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "slide,label,patient\n"
        + "".join(
            f"{s},{('normal', 'tumour')[y]},{g}\n"
            for s, y, g in zip(ids, TUMOUR, PATIENTS, strict=True)
        )
    )
    result = train(
        tmp_path / "archive", csv, ENC, tmp_path / "run", folds=3, epochs=2,
        val_fraction=0.34, min_epochs=1, **SMALL,
    )  # fmt: skip
    assert [f.test["auc"] is not None for f in result.folds] == [True] * 3
    rows = list(csv_module.DictReader((tmp_path / "run" / "splits.csv").open()))
    for f in result.folds:
        holding = {
            r["patient"] for r in rows if int(r["fold"]) != f.fold and r["label"] == "tumour"
        }
        assert len(holding) >= 2
        assert f.early_stopping or f"only {len(holding)} training patients" in str(f.note)


def test_a_split_patient_names_its_own_lines(tmp_path: Path) -> None:
    csv = tmp_path / "foldcol.csv"
    csv.write_text(
        "slide,label,patient,fold\n"
        "s00,tumour,P1,0\ns01,normal,P1,1\ns02,normal,P2,1\ns03,tumour,P2,1\n"
        "s04,normal,P3,0\ns05,normal,P4,0\ns06,tumour,P4,0\ns07,normal,P5,1\n"
        "s08,normal,P6,1\ns09,tumour,P6,0\n"
    )
    with pytest.raises(LabelsError) as caught:
        read_labels(csv)
    assert str(caught.value) == (
        f"{csv}: patient 'P1' is in folds [0, 1] (lines 2, 3); so is 1 other patient ('P6'); "
        "a patient's slides must share one fold"
    )
    assert caught.value.rows == [2, 3, 10, 11]


def test_labels_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    csv = tmp_path / "case.csv"
    csv.write_text("slide,label\ns0,tumour\ns1,normal\ns2,Tumour\ns3,tumour \ns4,Tumour\n")
    with pytest.raises(LabelsError) as caught:
        read_labels(csv)
    assert str(caught.value) == (
        f"{csv}: labels 'Tumour' (lines 4, 6) and 'tumour' (lines 2, 5) differ only in case, "
        "so they would be separate classes; spell each class one way in the CSV"
    )
    assert caught.value.rows == [2, 4, 5, 6]
    assert len(read_labels(csv, for_training=False).rows) == 5  # a filter is not a classifier
    with pytest.raises(LabelsError, match="differ only in case"):
        LabelTable.from_mapping({"s0": "Normal", "s1": "normal", "s2": "tumour"})


def test_train_json_prints_the_notes_on_stderr(tmp_path: Path) -> None:
    ids = _archive(tmp_path / "archive", 6)
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "slide,label\n" + "".join(f"{s},{'ab'[i % 2]}\n" for i, s in enumerate(ids)) + "zz,a\n"
    )
    code, out, err = run_cli(
        [
            *("mil", "train", str(tmp_path / "archive"), "--labels", str(csv), "--json"),
            *("--out", str(tmp_path / "run"), "--folds", "2", "--epochs", "1"),
            *("--val-fraction", "0", "--skip-missing", "--hidden-dim", "8", "--threads", "1"),
        ]
    )
    assert code == 0, err
    assert json.loads(out)["n_folds"] == 2
    assert err.splitlines() == [
        "note: left out 1 labelled slides with no complete store: 'zz' (line 8)",
        "note: fold 0: val_fraction is 0: trained every epoch, no early stopping",
        "note: fold 1: val_fraction is 0: trained every epoch, no early stopping",
    ]
