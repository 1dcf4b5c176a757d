"""MIL training on an archive where one bag's chunk has a flipped byte: the chunk keeps its
file, size and name, and fails zstd's content checksum only when decoded."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import run_cli
from wsi_ssl.errors import EmbeddingsCorruptError
from wsi_ssl.mil import train

ENC = "enc-x"
DAMAGED = f"{2:016x}"
LABELS = {f"{i:016x}": "ab"[i % 2] for i in range(8)}


@pytest.fixture(scope="module")
def rotten(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight one-chunk bags; slide 2's chunk has one bit flipped (bit rot)."""
    from wsi_ssl.testing.bags import write_bag_store

    root = tmp_path_factory.mktemp("mil-edges") / "archive"
    rng = np.random.default_rng(3)
    for i in range(8):
        write_bag_store(root, f"{i:016x}", rng.normal(size=(6, 4)), encoder_id=ENC)
    chunk = root / "slides" / f"{DAMAGED}.zarr" / "embeddings" / ENC / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    return root


def _csv(folder: Path) -> Path:
    path = folder / "labels.csv"
    path.write_text("slide,label\n" + "".join(f"{s},{y}\n" for s, y in LABELS.items()))
    return path


def test_skip_missing_leaves_out_a_bag_that_fails_its_checksum(
    rotten: Path, tmp_path: Path
) -> None:
    said: list[str] = []
    run = tmp_path / "run"
    options: dict[str, Any] = {"folds": 2, "epochs": 2, "device": "cpu", "log": said.append}
    result = train(rotten, LABELS, ENC, run, skip_missing=True, **options)
    # the up-front check says what it did, once, before the first epoch
    first, *epochs = said
    assert re.fullmatch(r"checked 8 bags for damaged embeddings in \d+\.\d s: 1 damaged", first)
    assert epochs and all(line.startswith("fold ") for line in epochs), said
    assert result.report.checked is not None and result.report.checked[0] == 8
    info = json.loads((run / "run.json").read_text())
    assert sorted(info["training_slides"]) == sorted(s for s in LABELS if s != DAMAGED)
    [row] = info["report"]["missing_embeddings"]
    assert row["slide"] == DAMAGED and row["line"] == 4
    assert "cannot be decoded" in row["damaged"] and "checksum" in row["damaged"]
    text = "\n".join(result.lines())
    assert (
        f"left out 1 labelled slides without usable embeddings {ENC}: "
        f"'{DAMAGED}' (line 4: rows 0.. cannot be decoded" in text
    ), text
    assert f"`wsi-ssl check {rotten}` prints the embed command" in text
    # the command line: the same run, the slide named with what is wrong
    argv = ["mil", "train", str(rotten), "--labels", str(_csv(tmp_path)), "--encoder", ENC]
    argv += ["--out", str(tmp_path / "cli-run"), "--folds", "2", "--epochs", "2"]
    code, out, err = run_cli([*argv, "--device", "cpu", "--skip-missing"])
    assert code == 0, err
    assert f"'{DAMAGED}' (line 4: rows 0.. cannot be decoded" in out and "checksum" in out
    assert (tmp_path / "cli-run" / "metrics.json").is_file()


def test_without_skip_missing_the_bag_stops_the_run_with_its_path(
    rotten: Path, tmp_path: Path
) -> None:
    store = rotten / "slides" / f"{DAMAGED}.zarr"
    with pytest.raises(EmbeddingsCorruptError, match="are damaged") as info:
        train(rotten, LABELS, ENC, tmp_path / "run", folds=2, epochs=2, device="cpu")
    assert info.value.path == store and "checksum" in str(info.value)
    argv = ["mil", "train", str(rotten), "--labels", str(_csv(tmp_path)), "--encoder", ENC]
    argv += ["--out", str(tmp_path / "cli-run"), "--folds", "2", "--epochs", "2"]
    code, out, err = run_cli([*argv, "--device", "cpu"])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and f"{store}: embeddings '{ENC}' are damaged" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]  # no run, no partial


def test_a_csv_fold_whose_training_slides_hold_one_class_is_refused_before_any_fit(
    tmp_path: Path,
) -> None:
    """Fold 1's training slides (fold 0) are all 'b': refused before fold 0 trains an epoch."""
    from wsi_ssl.errors import LabelsError
    from wsi_ssl.testing.bags import write_bag_store

    root = tmp_path / "archive"
    rng = np.random.default_rng(4)
    for i in range(8):
        write_bag_store(root, f"{i:016x}", rng.normal(size=(6, 4)), encoder_id=ENC)
    fold = {1: 0, 3: 0}  # the rest in fold 1
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "slide,label,fold\n"
        + "".join(f"{s},{y},{fold.get(i, 1)}\n" for i, (s, y) in enumerate(LABELS.items()))
    )
    epochs: list[str] = []
    with pytest.raises(LabelsError, match="fold 1: the training slides hold a single class"):
        train(
            root,
            csv,
            ENC,
            tmp_path / "run",
            epochs=3,
            device="cpu",
            log=epochs.append,
            progress=True,
        )
    assert epochs == []  # no fold was fitted first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive", "labels.csv"]
