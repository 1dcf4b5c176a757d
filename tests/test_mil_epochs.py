"""The epoch a fold keeps (early stopping) is numbered from 1 wherever a run says it: the
printed report, ``metrics.json``, the fold's checkpoint and its ``history.csv`` (metrics.json
said 0 for the epoch history.csv and the report call 1)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from conftest import run_cli

from wsi_ssl.testing.bags import write_bag_store


def _archive(root: Path, n_slides: int) -> Path:
    """Bags of two overlapping clusters (classes "a" and "b"); returns the labels CSV."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n_slides):
        centre = np.zeros(8)
        centre[i % 2] = 1.0
        sid = f"{i:016x}"
        write_bag_store(root, sid, centre + rng.normal(size=(10, 8)), encoder_id="enc-e")
        rows.append(f"{sid},{'ab'[i % 2]}\n")
    labels = root.parent / "labels.csv"
    labels.write_text("slide,label\n" + "".join(rows))
    return labels


def _best_in_history(path: Path) -> int:
    """The epoch early stopping keeps, read off history.csv: the first with the highest
    validation AUC, ties broken by the lower validation loss."""
    rows = list(csv.DictReader(path.open()))
    best = max(rows, key=lambda r: (float(r["val_auc"]), -float(r["val_loss"])))
    return int(best["epoch"])


def test_the_best_epoch_is_numbered_from_1_everywhere(tmp_path: Path) -> None:
    labels = _archive(tmp_path / "a", 16)
    run = tmp_path / "run"
    argv = ["mil", "train", str(tmp_path / "a"), "--labels", str(labels), "--out", str(run)]
    argv += ["--folds", "2", "--epochs", "8", "--val-fraction", "0.25", "--lr", "3e-2"]
    argv += ["--hidden-dim", "16", "--attention-dim", "8", "--threads", "1", "--device", "cpu"]
    code, stdout, err = run_cli(argv)
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["folds"]) == 2
    # a kept epoch before the last: the best epoch is not merely the number of epochs run
    assert any(f["best_epoch"] < f["epochs_run"] for f in metrics["folds"])
    for fold in metrics["folds"]:
        f = fold["fold"]
        assert fold["early_stopping"] and fold["n_val"] == 2
        best = _best_in_history(run / "folds" / f"fold_{f}" / "history.csv")
        assert fold["best_epoch"] == best and 1 <= best <= fold["epochs_run"]
        assert f"best epoch {best} of {fold['epochs_run']}:" in stdout
        ckpt = torch.load(run / "folds" / f"fold_{f}" / "model.pt", weights_only=True)
        assert ckpt["best_epoch"] == best
