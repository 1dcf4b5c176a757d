"""A MIL run and the archive it predicts, damaged: a checkpoint whose bytes were altered after
training, a full disk while the run is written, a slide store with unreadable metadata.

Real runs trained on bag stores (:func:`~wsi_ssl.testing.bags.write_bag_store`), real
``wsi-ssl`` commands in-process; the full disk is the storage layer's ``WSI_SSL_FAULT`` hook
and, where this machine lets a test mount one, a real tmpfs.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import mounted_tmpfs, run_cli
from wsi_ssl import mil
from wsi_ssl.errors import CheckpointError, DiskFullError
from wsi_ssl.storage.atomic import FAULT_ENV
from wsi_ssl.testing.bags import write_bag_store

ENC = "enc-damage"
IDS = [f"{i:016x}" for i in range(8)]
TRAIN = {"folds": 2, "epochs": 2, "min_epochs": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Eight slides (two classes) and a run trained on them: (archive, labels CSV, run)."""
    base = tmp_path_factory.mktemp("mil-damage")
    rng = np.random.default_rng(5)
    for i, sid in enumerate(IDS):
        x = rng.normal(size=(6, 4))
        x[:, 0] += 2.0 if i % 2 else -2.0
        write_bag_store(base / "archive", sid, x, encoder_id=ENC)
    labels = base / "labels.csv"
    labels.write_text("slide,label\n" + "".join(f"{s},{'ab'[i % 2]}\n" for i, s in enumerate(IDS)))
    mil.train(base / "archive", labels, ENC, base / "run", **TRAIN)
    return base / "archive", labels, base / "run"


def _probabilities(run: Path, root: Path, out: Path) -> dict[str, list[float]]:
    result = mil.predict(run, root, out, explain=False)
    assert not result.failed
    return {p.slide_id: list(p.probabilities.values()) for p in result.predictions}


def _alter(checkpoint: Path) -> None:
    """Flip 8 bytes in the middle of the checkpoint's largest tensor (the low bit of each, so
    the weights stay finite and the file still loads)."""
    with zipfile.ZipFile(checkpoint) as z:
        largest = max(z.infolist(), key=lambda i: i.file_size)
    at = largest.header_offset + largest.file_size // 2
    data = bytearray(checkpoint.read_bytes())
    data[at : at + 8] = bytes(b ^ 0x01 for b in data[at : at + 8])
    checkpoint.write_bytes(bytes(data))


def test_an_altered_checkpoint_is_refused_and_an_untouched_run_predicts_as_before(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, _, run = trained
    info = json.loads((run / "run.json").read_text())
    assert info["checkpoint_sha256"] == {
        rel: hashlib.sha256((run / rel).read_bytes()).hexdigest() for rel in info["checkpoints"]
    }
    before = _probabilities(run, root, tmp_path / "p0")

    damaged = shutil.copytree(run, tmp_path / "M")
    checkpoint = damaged / "folds" / "fold_1" / "model.pt"
    _alter(checkpoint)
    torch.load(checkpoint, map_location="cpu", weights_only=True)  # still decodes: silent
    with pytest.raises(CheckpointError, match="train the run again") as caught:
        mil.predict(damaged, root, tmp_path / "p1", explain=False)
    assert str(checkpoint) in str(caught.value)
    argv = ["mil", "predict", str(damaged), str(root), "--out", str(tmp_path / "p2")]
    code, stdout, stderr = run_cli([*argv, "--no-explain", "--quiet"])
    assert code == 2 and stdout == ""
    assert stderr.splitlines() == [f"wsi-ssl: error: {caught.value}"]
    assert not (tmp_path / "p2" / "predictions.csv").exists()

    # the untouched run, and a run written before the digests were recorded, predict as before
    assert _probabilities(run, root, tmp_path / "p3") == before
    older = shutil.copytree(run, tmp_path / "older")
    del info["checkpoint_sha256"]
    (older / "run.json").write_text(json.dumps(info))
    assert _probabilities(older, root, tmp_path / "p4") == before


def test_a_full_disk_at_a_checkpoint_is_disk_full_and_leaves_no_run(
    trained: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, labels, run = trained
    monkeypatch.setenv(FAULT_ENV, "enospc_before_rename:model.pt")
    out = tmp_path / "new"
    with pytest.raises(DiskFullError) as caught:
        mil.train(root, labels, ENC, out, **TRAIN)
    cause = caught.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC
    assert cause.filename.endswith("model.pt")  # the hook fired at the checkpoint's rename
    assert list(tmp_path.iterdir()) == []  # no run, no .new.partial

    old = shutil.copytree(run, tmp_path / "old")
    recorded = (old / "run.json").read_bytes()
    argv = ["mil", "train", str(root), "--labels", str(labels), "--out", str(old)]
    code, stdout, stderr = run_cli([*argv, "--folds", "2", "--epochs", "2", "--overwrite"])
    assert code == 2 and stdout == ""
    assert stderr.splitlines() == [
        f"wsi-ssl: error: {old}: no space left on device; free space or write elsewhere, then "
        "re-run (the unfinished output was removed)"
    ]
    assert (old / "run.json").read_bytes() == recorded  # the run it would replace is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_a_real_full_disk_is_one_disk_full_line(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, labels, _ = trained
    with mounted_tmpfs(tmp_path / "tiny", "64k") as tiny:  # a checkpoint is ~270 KB
        argv = ["mil", "train", str(root), "--labels", str(labels), "--out", str(tiny / "run")]
        code, _, stderr = run_cli([*argv, "--folds", "2", "--epochs", "2"])
        assert code == 2
        assert stderr.splitlines() == [
            f"wsi-ssl: error: {tiny / 'run'}: no space left on device; free space or write "
            "elsewhere, then re-run (the unfinished output was removed)"
        ]
        assert list(tiny.iterdir()) == []


def test_predict_names_a_store_with_unreadable_metadata_and_predicts_the_rest(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    archive, _, run = trained
    root = shutil.copytree(archive, tmp_path / "C")
    out = tmp_path / "pC"
    _probabilities(run, root, out)  # an earlier prediction of every slide
    store = root / "slides" / f"{IDS[3]}.zarr"
    (store / "tiles" / "zarr.json").unlink()

    argv = ["mil", "predict", str(run), str(root), "--out", str(out), "--no-explain", "--quiet"]
    code, stdout, stderr = run_cli(argv)
    assert code == 1
    assert f"{len(IDS) - 1} slide(s) predicted, 1 failed" in stdout
    [line] = stderr.splitlines()
    assert line.startswith(f"wsi-ssl: error: {store}: slide store is damaged")
    assert f"`wsi-ssl check {root}`" in line
    with (out / "predictions.csv").open(newline="") as f:
        rows = {row["slide_id"] for row in csv.DictReader(f)}
    assert rows == set(IDS) - {IDS[3]}  # its earlier row went: it is not current
