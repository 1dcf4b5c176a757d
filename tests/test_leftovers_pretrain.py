"""A pretrain run refused before it trains leaves nothing behind: not the run directory it
made for itself (nor the folders above it that it made), not its lock file."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import run_cli

FAST = ["--batch-size", "8", "--device", "cpu", "--num-workers", "0", "--num-threads", "1"]
FAST += ["--global-crop-size", "32", "--local-crop-size", "16", "--out-dim", "64", "--quiet"]
INIT = "vit_small_patch16_224"  # a registry encoder with a weights file, small enough to build


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_missing_init_weights_leave_no_run_dir_and_no_lock(
    synthetic_root_64: Path, tmp_path: Path
) -> None:
    """``--init`` whose weights file is not there: the run directory (and ``runs/`` above it,
    made for it) and its ``.lock`` were left behind by the refusal."""
    out = tmp_path / "runs" / "run"
    argv = ["pretrain", str(synthetic_root_64), "--out", str(out), *FAST, "--steps", "1"]
    weights = tmp_path / "nosuch.pth"
    code, stdout, err = run_cli([*argv, "--init", INIT, "--weights", str(weights)])
    assert code == 2 and f"{weights}: no such weights file" in err, err
    assert stdout == "" and _files(tmp_path) == []  # refused before the start notes too
    out.mkdir(parents=True)  # a folder the user made: kept, empty as it was
    code, _, err = run_cli([*argv, "--init", INIT, "--weights", str(weights)])
    assert code == 2 and _files(tmp_path) == ["runs", "runs/run"], err


def test_init_weights_that_do_not_fit_leave_no_run_dir_and_no_lock(
    synthetic_root_64: Path, tmp_path: Path
) -> None:
    """A weights file that is there but is not the encoder's is refused as the models are
    built, with the run's lock held: the refusal removes the lock file and the folders."""
    weights = tmp_path / "w" / "wrong.pth"
    weights.parent.mkdir()
    torch.save({"not_a_layer": torch.zeros(2)}, weights)
    out = tmp_path / "runs" / "run"
    argv = ["pretrain", str(synthetic_root_64), "--out", str(out), *FAST, "--steps", "1"]
    code, _, err = run_cli([*argv, "--init", INIT, "--weights", str(weights)])
    assert code != 0 and "wsi-ssl: error:" in err, err
    assert _files(tmp_path) == ["w", "w/wrong.pth"]


def test_a_run_that_trains_keeps_its_folder_and_drops_its_lock_file(
    synthetic_root_64: Path, tmp_path: Path
) -> None:
    """The folder a run wrote in stays whole; the lock file goes with the run."""
    out = tmp_path / "run"
    argv = ["pretrain", str(synthetic_root_64), "--out", str(out), *FAST, "--steps", "1"]
    code, _, err = run_cli([*argv, "--preset", "cpu-small"])
    assert code == 0, err
    assert (out / "encoder.pt").is_file() and not (out / ".lock").exists()
