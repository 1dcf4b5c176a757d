"""Checkpoint files: atomic writes, weights-only loading, clear errors for bad files."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_ssl.errors import CheckpointError
from wsi_ssl.ssl.checkpoint import (
    ENCODER_FORMAT,
    FORMAT_VERSION,
    RUN_FORMAT,
    capture_rng,
    checkpoint_paths,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    step_path,
)


def _payload(arch: str = "resnet18_tiny", step: int = 3) -> dict:
    return {
        "format": RUN_FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": {"config": {"arch": arch}, "step": step},
        "student": {"w": torch.arange(6.0)},
        "teacher": {"w": torch.ones(6)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "center": torch.zeros(1, 1, 4),
        "rng": capture_rng(),
        "window_loss": torch.zeros(()),
    }


def test_round_trip_and_listing(tmp_path: Path) -> None:
    for step in (10, 2, 30):
        save_checkpoint(step_path(tmp_path, step), _payload(step=step))
    assert [p.name for p in checkpoint_paths(tmp_path)] == [
        "step_00000002.pt",
        "step_00000010.pt",
        "step_00000030.pt",
    ]
    data = load_checkpoint(latest_checkpoint(tmp_path), kind=RUN_FORMAT, arch="resnet18_tiny")
    assert data["meta"]["step"] == 30 and torch.equal(data["student"]["w"], torch.arange(6.0))
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary files left


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, _payload(step=1))
    bad = _payload(step=2)
    bad["student"] = {"w": lambda: None}  # not serialisable
    with pytest.raises(Exception):  # noqa: B017  (whatever pickle raises)
        save_checkpoint(path, bad)
    assert load_checkpoint(path)["meta"]["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    with pytest.raises(CheckpointError, match="not JSON-able"):
        save_checkpoint(path, {**_payload(), "meta": {"x": object()}})


def test_truncated_and_garbage_files(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path / "good.pt", _payload())
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(cut)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(noise)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_arbitrary_objects_are_never_unpickled(tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": RUN_FORMAT, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(path)
    assert "unpickled!" not in capsys.readouterr().out
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_checkpoint(plain)


def test_wrong_format_version_kind_and_arch(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, other)
    with pytest.raises(CheckpointError, match="not a wsi-ssl checkpoint"):
        load_checkpoint(other)
    newer = save_checkpoint(tmp_path / "newer.pt", {**_payload(), "format_version": 99})
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(newer)
    run = save_checkpoint(tmp_path / "run.pt", _payload(arch="vit_nano_patch8"))
    with pytest.raises(CheckpointError, match="for arch 'vit_nano_patch8', not 'resnet18_tiny'"):
        load_checkpoint(run, arch="resnet18_tiny")
    with pytest.raises(CheckpointError, match=r"a 'wsi_ssl\.encoder' checkpoint is needed"):
        load_checkpoint(run, kind=ENCODER_FORMAT)
    lacking = save_checkpoint(
        tmp_path / "lacking.pt", {k: v for k, v in _payload().items() if k != "teacher"}
    )
    with pytest.raises(CheckpointError, match="lacks \\['teacher'\\]"):
        load_checkpoint(lacking)


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    path = save_checkpoint(tmp_path / "rng.pt", _payload())
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    restore_rng(load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
