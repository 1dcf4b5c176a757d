"""Cross-validation splits: stratified, patient-disjoint, seeded."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest

from wsi_ssl.mil.splits import assign_folds, patient_labels


def _random_cohort(rng: np.random.Generator) -> tuple[list[int], list[str]]:
    """Patients with 1-4 slides each; most patients' slides share a label, some are mixed."""
    labels, groups = [], []
    n_classes = int(rng.integers(2, 4))
    for p in range(int(rng.integers(15, 60))):
        y = int(rng.integers(0, n_classes))
        for _ in range(int(rng.integers(1, 5))):
            labels.append(y if rng.random() > 0.1 else int(rng.integers(0, n_classes)))
            groups.append(f"patient-{p}")
    return labels, groups


@pytest.mark.parametrize("seed", range(20))
def test_folds_never_share_a_patient(seed: int) -> None:
    """(Stratification by the patients holding each class: tests/test_mil_folds_edges.py.)"""
    rng = np.random.default_rng(seed)
    labels, groups = _random_cohort(rng)
    k = int(rng.integers(2, 6))
    folds = assign_folds(labels, groups, k, seed=seed)
    assert folds.shape == (len(labels),) and set(folds.tolist()) <= set(range(k))
    folds_of = defaultdict(set)
    for g, f in zip(groups, folds, strict=True):
        folds_of[g].add(int(f))
    assert all(len(fs) == 1 for fs in folds_of.values()), "a patient is in two folds"


def test_slides_without_patients_are_their_own_group() -> None:
    labels = [0] * 10 + [1] * 5
    folds = assign_folds(labels, None, 5, seed=3)
    for f in range(5):
        assert Counter(np.array(labels)[folds == f].tolist()) == {0: 2, 1: 1}


def test_splits_are_seeded() -> None:
    labels, groups = _random_cohort(np.random.default_rng(0))
    a = assign_folds(labels, groups, 4, seed=1)
    assert np.array_equal(a, assign_folds(labels, groups, 4, seed=1))
    assert not np.array_equal(a, assign_folds(labels, groups, 4, seed=2))


def test_a_patient_is_dealt_by_its_rarest_class() -> None:
    """a holds classes 1 and 0, b 0 and 2: each is dealt by the class fewest patients hold."""
    assert patient_labels([1, 1, 0, 0, 2], ["a", "a", "a", "b", "b"]) == {"a": 1, "b": 2}


def _bag_archive(root, n_slides: int, rng: np.random.Generator) -> None:
    from wsi_ssl.testing.bags import write_bag_store

    for i in range(n_slides):
        write_bag_store(root, f"{i:016x}", rng.normal(size=(6, 4)), encoder_id="enc-x")


def test_training_folds_never_share_a_patient(tmp_path) -> None:
    """train() with a patient column: every patient's slides sit in one test fold, and each
    fold's validation slides come from other patients than its training slides."""
    import csv

    from wsi_ssl.mil import train

    rng = np.random.default_rng(5)
    _bag_archive(tmp_path / "a", 40, rng)
    rows, patient = [], 0
    i = 0
    while i < 40:
        size = min(int(rng.integers(1, 4)), 40 - i)
        label = "pos" if patient % 2 else "neg"
        rows += [(f"{j:016x}", label, f"P{patient}") for j in range(i, i + size)]
        i, patient = i + size, patient + 1
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label,patient\n" + "".join(",".join(r) + "\n" for r in rows))
    result = train(
        tmp_path / "a", labels, None, tmp_path / "run", folds=4, epochs=1, hidden_dim=8,
        attention_dim=4, device="cpu", threads=1,
    )  # fmt: skip
    splits = list(csv.DictReader((tmp_path / "run" / "splits.csv").open()))
    folds_of = defaultdict(set)
    for row in splits:
        folds_of[row["patient"]].add(row["fold"])
    assert all(len(f) == 1 for f in folds_of.values())
    assert {r["fold"] for r in splits} == {"0", "1", "2", "3"}
    assert sum(f.n_train + f.n_val + f.n_test for f in result.folds) == 4 * 40
    assert all(f.n_val > 0 for f in result.folds)


def test_validation_split_never_shares_a_patient_with_training() -> None:
    """The early-stopping split inside a fold's training slides keeps patients whole."""
    from wsi_ssl.mil.cv import inner_split as _inner_split

    rng = np.random.default_rng(3)
    for seed in range(10):
        groups = [f"P{int(p)}" for p in rng.integers(0, 15, 40)]
        y = np.array([int(g[1:]) % 2 for g in groups])  # label follows the patient
        val, note = _inner_split(y, groups, ["neg", "pos"], 0.25, seed)
        assert val is not None and note is None and 0 < val.sum() < len(y)
        for patient in set(groups):
            sides = {bool(val[i]) for i, g in enumerate(groups) if g == patient}
            assert len(sides) == 1, patient
        assert set(y[val]) == {0, 1}  # stratified: both classes in validation
    # a class with fewer patients than the parts (5 for 0.2): each part still holds both
    # classes, or there is no split (one patient of a class made a one-class validation)
    groups = ["n1", "n2", "n3", "t1", "t2", "t3", "t4", "t5", "t6"]
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1])
    for seed in range(10):
        val, note = _inner_split(y, groups, ["normal", "tumour"], 0.2, seed)
        assert val is not None and note is None and set(y[val]) == {0, 1}
        assert val.sum() == 3  # one part of 3: a normal and two tumours
    val, note = _inner_split(y[1:], groups[1:], ["normal", "tumour"], 0.2, 0)
    assert val is None and note is not None and "only 2 training patients of class 'normal'" in note
    # patients with slides of several classes are dealt by their most common label: counting
    # them for every class they touch, 113 of 200 seeds gave a split without class 'c'
    groups = [
        "B1",
        "B2",
        *[f"M{i}" for i in range(7) for _ in range(3)],
        *[f"A{i}" for i in range(10)],
    ]
    y = np.array([1, 1, *[0, 1, 2] * 7, *[0] * 10])
    for seed in range(20):
        val, note = _inner_split(y, groups, ["a", "b", "c"], 0.2, seed)
        assert val is None or set(y[val]) == {0, 1, 2}, seed


def test_a_fold_column_replaces_the_generated_split(tmp_path) -> None:
    import csv

    from wsi_ssl.mil import train

    _bag_archive(tmp_path / "a", 9, np.random.default_rng(0))
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "slide,label,fold\n" + "".join(f"{i:016x},{'ab'[i % 2]},{10 * (i % 3)}\n" for i in range(9))
    )
    result = train(
        tmp_path / "a", labels, "enc-x", tmp_path / "run", epochs=1, val_fraction=0.0,
        hidden_dim=8, attention_dim=4, device="cpu",
    )  # fmt: skip
    splits = list(csv.DictReader((tmp_path / "run" / "splits.csv").open()))
    assert [int(r["fold"]) for r in splits] == [i % 3 for i in range(9)]
    assert len(result.folds) == 3 and not any(f.early_stopping for f in result.folds)
    assert all(f.note and "no early stopping" in f.note for f in result.folds)
    assert result.notes[0] == (
        "the labels CSV's 'fold' column gives 3 folds; folds=5 is not used (drop the column "
        "to split anew)"
    )
    assert result.notes[0] in result.lines()


def test_a_failed_training_leaves_no_run(tmp_path) -> None:
    from wsi_ssl.errors import EmbeddingsCorruptError
    from wsi_ssl.mil import train
    from wsi_ssl.testing.bags import write_bag_store

    _bag_archive(tmp_path / "a", 6, np.random.default_rng(0))
    # a bag whose one chunk file was lost after it was written: the read refuses it
    bad = write_bag_store(tmp_path / "a", "f" * 16, np.ones((6, 4)), encoder_id="enc-x")
    (bad / "embeddings" / "enc-x" / "c" / "0" / "0").unlink()
    labels = {f"{i:016x}": "ab"[i % 2] for i in range(6)} | {"f" * 16: "a"}
    with pytest.raises(EmbeddingsCorruptError, match="1 of 1 chunk files missing"):
        train(tmp_path / "a", labels, None, tmp_path / "run", folds=2, epochs=2, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
