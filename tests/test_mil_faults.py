"""The MIL run directory under faults: a second writer, SIGKILL at each rename of the swap.

Real processes: each fault runs ``wsi_ssl.mil.train`` in a subprocess that kills (or stops)
itself at a rename through the storage layer's ``WSI_SSL_FAULT`` hook.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wsi_ssl.errors import ConfigError, DiskFullError, StoreLockedError
from wsi_ssl.storage.atomic import FAULT_ENV, aside_directory

pytestmark = [pytest.mark.faults, pytest.mark.slow]

TRAIN = (
    "import sys; from wsi_ssl.mil import train; "
    "train(sys.argv[1], {f'{i:016x}': 'ab'[i % 2] for i in range(8)}, 'enc-x', sys.argv[2], "
    "folds=2, epochs=int(sys.argv[3]), device='cpu', overwrite=True, progress=False)"
)


def _archive(root: Path) -> None:
    from wsi_ssl.testing.bags import write_bag_store

    rng = np.random.default_rng(3)
    for i in range(8):
        write_bag_store(root, f"{i:016x}", rng.normal(size=(6, 4)), encoder_id="enc-x")


def _train_in_process(root: Path, out: Path, epochs: int, **options: object) -> dict:
    from wsi_ssl.mil import train

    labels = {f"{i:016x}": "ab"[i % 2] for i in range(8)}
    train(root, labels, "enc-x", out, folds=2, epochs=epochs, device="cpu", **options)
    return json.loads((out / "run.json").read_text())


def _train_process(root: Path, out: Path, epochs: int, fault: str) -> subprocess.Popen:
    env = {**os.environ, FAULT_ENV: fault}
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN, str(root), str(out), str(epochs)], env=env
    )


def _epochs(run: Path) -> int:
    return int(json.loads((run / "run.json").read_text())["config"]["epochs"])


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mil-faults") / "archive"
    _archive(root)
    return root


def test_killed_at_each_rename_leaves_a_whole_run(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train_in_process(archive, out, epochs=2)
    assert _epochs(out) == 2
    # killed before the old run is set aside: the old run is untouched
    proc = _train_process(archive, out, 3, f"kill_before_rename:{aside_directory(out)}")
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert _epochs(out) == 2
    # killed between the two renames: the old run is aside; a reader or the next train puts it back
    proc = _train_process(archive, out, 3, f"kill_before_rename:{out}")
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert not out.exists() and aside_directory(out).is_dir()
    from wsi_ssl.mil.run import load

    assert load(out).config.epochs == 2  # a reader puts the old run back too (it found none)
    assert out.is_dir() and not aside_directory(out).exists()
    with pytest.raises(ConfigError, match="already exists"):
        _train_in_process(archive, out, epochs=3)  # restored first, then refused: no overwrite
    assert _epochs(out) == 2 and not aside_directory(out).exists()
    # a plain re-run completes the new run
    _train_in_process(archive, out, epochs=3, overwrite=True)
    assert _epochs(out) == 3
    assert not any(p.name.startswith(f".{out.name}") for p in tmp_path.iterdir())


def test_a_second_writer_is_refused_while_the_first_holds_the_run(
    archive: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    _train_in_process(archive, out, epochs=2)
    first = _train_process(archive, out, 3, f"pause_before_rename:{aside_directory(out)}")
    try:
        deadline = time.monotonic() + 300
        while not _stopped(first.pid):  # paused at its swap, holding the run's lock
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        # the run's lock is the run's: a job training on another archive is refused too
        other = shutil.copytree(archive, tmp_path / "other")
        for root in (archive, other):
            with pytest.raises(StoreLockedError, match=f"pid {first.pid}"):
                _train_in_process(root, out, epochs=4, overwrite=True)
    finally:
        first.kill()
        first.wait(timeout=60)
    assert _epochs(out) == 2  # the killed writer left the previous run whole
    _train_in_process(archive, out, epochs=4, overwrite=True)
    assert _epochs(out) == 4


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_full_disk_at_the_swap_keeps_the_old_run(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    _train_in_process(archive, out, epochs=2)
    monkeypatch.setenv(FAULT_ENV, f"enospc_before_rename:{out}")
    with pytest.raises(DiskFullError, match="no space left"):
        _train_in_process(archive, out, epochs=3, overwrite=True)
    monkeypatch.delenv(FAULT_ENV)
    # the old run is aside (the new one never landed); the next train puts it back first
    _train_in_process(archive, out, epochs=3, overwrite=True)
    assert _epochs(out) == 3
    assert not any(p.name.startswith(f".{out.name}") for p in tmp_path.iterdir())


def test_an_interrupted_training_says_it_starts_over_and_leaves_no_run(
    archive: Path, tmp_path: Path
) -> None:
    """Ctrl-C (SIGINT) while ``wsi-ssl mil train`` is about to publish: exit 130, no run and
    no partial folder left, and the advice fits MIL (it trains again from the start)."""
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\n" + "".join(f"{i:016x},{'ab'[i % 2]}\n" for i in range(8)))
    out = tmp_path / "run"
    argv = ["mil", "train", str(archive), "--labels", str(labels), "--encoder", "enc-x"]
    argv += ["--out", str(out), "--folds", "2", "--epochs", "2", "--device", "cpu"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsi_ssl.cli.main", *argv],
        env={**os.environ, FAULT_ENV: f"pause_before_rename:{out}"},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not _stopped(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == (
        "wsi-ssl: interrupted; no run was written; the same command trains it again from the start"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]
