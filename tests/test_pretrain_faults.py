"""A pretraining run directory under faults: a second run into the same directory while the
first is paused at a checkpoint rename, then the first SIGKILLed; ``--resume`` completes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from wsi_ssl.storage.atomic import FAULT_ENV

pytestmark = [pytest.mark.faults, pytest.mark.slow]

ARGS = ["--preset", "cpu-small", "--steps", "2", "--checkpoint-every", "1", "--batch-size", "8"]
ARGS += ["--device", "cpu", "--num-workers", "0", "--quiet"]


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_second_pretrain_is_refused_and_resume_completes(
    small_archive: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    argv = ["pretrain", str(small_archive), "--out", str(out), *ARGS]
    code = "import sys; from wsi_ssl.cli.main import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, FAULT_ENV: "pause_before_rename:step_00000001"}
    first = subprocess.Popen([sys.executable, "-c", code, *argv], env=env)
    try:
        deadline = time.monotonic() + 300
        while not _stopped(first.pid):  # paused at its first checkpoint, holding the run's lock
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        rc, _, err = run_cli(argv)
        assert rc == 1 and f"being written by pid {first.pid}" in err  # busy: retry later
        assert len(err.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait(timeout=60)
    assert not list(
        (out / "checkpoints").glob("step_*.pt")
    )  # the killed run never published a checkpoint
    rc, _, err = run_cli([*argv, "--resume"])
    assert rc == 0, err
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*.pt"))[-1] == "step_00000002.pt"
    assert (out / "encoder.pt").is_file()


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(
    small_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    argv = ["pretrain", str(small_archive), "--out", str(out), *ARGS]
    assert run_cli([*argv, "--until-step", "1"])[0] == 0
    resume = ["pretrain", str(small_archive), "--out", str(out), "--resume", "--quiet"]
    monkeypatch.setenv(FAULT_ENV, "enospc_before_rename:step_00000002")
    rc, _, err = run_cli(resume)
    assert rc == 2 and "No space left" in err and len(err.strip().splitlines()) == 1
    monkeypatch.delenv(FAULT_ENV)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_00000001.pt"]  # the previous checkpoint, and no temp file
    assert run_cli(resume)[0] == 0
    assert (out / "checkpoints" / "step_00000002.pt").is_file()


def test_resume_before_the_first_checkpoint_keeps_the_runs_settings(
    small_archive: Path, tmp_path: Path
) -> None:
    """A run stopped before its first checkpoint (Ctrl-C or a kill early on a CPU): a plain
    ``--resume`` starts it again with the settings its config.json records, not the
    defaults; other training settings are refused, as they are against a checkpoint."""
    out = tmp_path / "run"
    argv = ["pretrain", str(small_archive), "--out", str(out), *ARGS]
    assert run_cli([*argv, "--until-step", "1"])[0] == 0
    recorded = json.loads((out / "config.json").read_text())["config"]
    for checkpoint in (out / "checkpoints").glob("step_*.pt"):
        checkpoint.unlink()  # as if stopped before its first one
    rc, _, err = run_cli(["pretrain", str(small_archive), "--out", str(out), "--resume", "--quiet"])
    assert rc == 0, err
    again = json.loads((out / "config.json").read_text())["config"]
    for key in ("arch", "steps", "batch_size", "out_dim", "checkpoint_every", "method"):
        assert again[key] == recorded[key], key
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*.pt"))[-1] == "step_00000002.pt"
    for checkpoint in (out / "checkpoints").glob("step_*.pt"):
        checkpoint.unlink()
    rc, _, err = run_cli([*argv, "--batch-size", "4", "--resume"])
    assert rc == 2 and "other training settings" in err and "batch_size" in err, err


def test_a_curated_run_resumes_from_anywhere_and_refuses_a_changed_selection(
    small_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--curation cur.json`` given relative is recorded absolute, so ``--resume`` works from
    another folder (it looked for cur.json there); a curation file rewritten with other tiles
    is refused on resume (the run went on silently on another selection)."""
    monkeypatch.chdir(tmp_path)
    curate = ["curate", str(small_archive), "--out", "cur.json", "--n-clusters", "2", "--no-dedup"]
    assert run_cli([*curate, "--n-tiles", "24"])[0] == 0
    out = tmp_path / "run"
    argv = ["pretrain", str(small_archive), "--out", str(out), *ARGS, "--curation", "cur.json"]
    rc, _, err = run_cli([*argv, "--until-step", "1"])
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["config"]["curation"] == str(
        tmp_path / "cur.json"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resume = ["pretrain", str(small_archive), "--out", str(out), "--resume", "--quiet"]
    rc, _, err = run_cli([*resume, "--until-step", "1"])
    assert rc == 0, err
    monkeypatch.chdir(tmp_path)
    assert run_cli([*curate, "--n-tiles", "16"])[0] == 0  # the same file, other tiles
    rc, _, err = run_cli(resume)
    assert rc == 2 and "selected tiles, the selection now gives" in err, err
