"""MIL retrieval (``model="retrieval"``) on bag stores of known clusters: a ``k`` that lets
every training slide of a fold vote is refused before any fold is fitted (the vote would
ignore similarity: every test slide of the fold got the same tie-broken vote, and AUC and
balanced accuracy were reported as if real); a ``k`` that leaves slides out classifies."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from wsi_ssl import mil
from wsi_ssl.errors import ConfigError
from wsi_ssl.mil.retrieval import largest_voting_k
from wsi_ssl.testing.bags import write_bag_store

ENCODER = "enc-clusters"


def _archive(root: Path, n_slides: int) -> dict[str, str]:
    """``n_slides`` bags, alternately of class "a" (tiles near one axis) and "b" (near
    another), so the nearest slides of a query share its class; returns slide -> label."""
    rng = np.random.default_rng(0)
    labels = {}
    for i in range(n_slides):
        centre = np.zeros(8)
        centre[i % 2] = 4.0
        sid = f"{i:016x}"
        write_bag_store(root, sid, centre + rng.normal(size=(12, 8)), encoder_id=ENCODER)
        labels[sid] = "ab"[i % 2]
    return labels


def test_the_largest_voting_k_leaves_one_slide_out() -> None:
    assert [largest_voting_k(n) for n in (0, 1, 2, 4, 7)] == [0, 0, 1, 3, 6]


@pytest.mark.parametrize("k", [4, 5])
def test_a_k_that_lets_every_training_slide_vote_is_refused_before_training(
    tmp_path: Path, k: int
) -> None:
    """8 slides in 2 folds: 4 training slides per fold; k=4 or 5 lets all of them vote."""
    labels = _archive(tmp_path / "a", 8)
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        mil.train(tmp_path / "a", labels, None, out, model="retrieval", folds=2, k=k)
    assert str(info.value) == (
        f"k={k} lets all 4 training slides of fold 0 vote for each of its test slides, so the "
        "retrieval vote ignores similarity; use k=3 or fewer, or label more slides"
    )
    assert info.value.parameters == ("k",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no run, no partial run


def test_the_fold_with_the_fewest_training_slides_is_named(tmp_path: Path) -> None:
    """A 'fold' column of 5, 2 and 2 slides: fold 0 trains on 4 and is the one named; a k
    below that classifies the clusters by their neighbours (no tie-broken votes)."""
    labels = _archive(tmp_path / "a", 9)
    csv_path = tmp_path / "labels.csv"
    folds = [0, 0, 0, 0, 0, 1, 1, 2, 2]
    csv_path.write_text(
        "slide,label,fold\n"
        + "".join(f"{s},{y},{f}\n" for (s, y), f in zip(labels.items(), folds, strict=True))
    )
    with pytest.raises(ConfigError, match=r"^k=4 lets all 4 training slides of fold 0 vote"):
        mil.train(tmp_path / "a", csv_path, None, tmp_path / "run", model="retrieval", k=4)
    result = mil.train(tmp_path / "a", csv_path, None, tmp_path / "run", model="retrieval", k=3)
    assert [f.n_train for f in result.folds] == [4, 7, 7]
    assert result.overall["auc"] == 1.0 and result.overall["balanced_accuracy"] == 1.0
    for row in csv.DictReader((tmp_path / "run" / "predictions.csv").open()):
        assert row["predicted"] == row["label"]
        assert float(row[f"prob_{row['label']}"]) >= 2 / 3  # a real majority, not a tie


def test_the_cli_names_the_flag(tmp_path: Path) -> None:
    labels = _archive(tmp_path / "a", 8)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("slide,label\n" + "".join(f"{s},{y}\n" for s, y in labels.items()))
    argv = ["mil", "train", str(tmp_path / "a"), "--labels", str(csv_path)]
    argv += ["--out", str(tmp_path / "run"), "--model", "retrieval", "--folds", "2"]
    code, stdout, err = run_cli(argv)  # the default k=5
    assert code == 2 and stdout == "" and not (tmp_path / "run").exists()
    assert "k=5 lets all 4 training slides of fold 0 vote" in err
    assert "; use --k 3 or fewer, or label more slides" in err
    code, stdout, err = run_cli([*argv, "--k", "3"])
    assert code == 0, err
    assert "fold 0: 4 train / 0 val / 4 test slides, 3-NN vote: AUC 1.000" in stdout
