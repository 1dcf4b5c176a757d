"""The archive never loses or silently corrupts work: real processes racing, killed at the
rename (``WSI_SSL_FAULT``, see ``wsi_ssl.storage.atomic``) and a full disk, for embed, index,
export and pretraining checkpoints. After each, the archive is in its previous or its new
complete state, ``wsi-ssl check`` says so, and a plain re-run completes it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import run_cli
from wsi_ssl.storage import open_store
from wsi_ssl.storage.atomic import FAULT_ENV
from wsi_ssl.storage.fingerprint import fingerprint_file, slide_id_from_fingerprint
from wsi_ssl.synthetic import write_synthetic_slide

pytestmark = pytest.mark.faults

EMBED = ["--encoder", "random-cnn", "--device", "cpu", "--workers", "0", "--quiet"]


def _cli_process(argv: list[str], fault: str) -> subprocess.Popen[bytes]:
    """``wsi-ssl`` in a real process with the fault hook armed."""
    code = "import sys; from wsi_ssl.cli.main import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, FAULT_ENV: fault}
    return subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stderr=subprocess.PIPE)


def _wait_stopped(proc: subprocess.Popen[Any], timeout: float = 180) -> None:
    """Until ``proc`` has stopped itself (SIGSTOP at the fault point)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        assert proc.poll() is None, "the process ended before reaching the fault point"
        time.sleep(0.05)
    raise AssertionError("the process never reached the fault point")


def _vectors(root: Path) -> dict[str, np.ndarray]:
    archive = open_store(root)
    return {sid: np.asarray(archive.embeddings(sid).features) for sid in archive.slide_ids}


def _check(root: Path) -> tuple[int, str]:
    code, out, _ = run_cli(["check", str(root)])
    return code, out


@pytest.mark.slow
def test_embed_second_job_and_a_kill_at_the_rename(small_archive: Path, tmp_path: Path) -> None:
    want = _vectors(small_archive)
    root = shutil.copytree(small_archive, tmp_path / "root")
    for store in (root / "slides").glob("*.zarr"):
        shutil.rmtree(store / "embeddings")
    first = _cli_process(["embed", str(root), *EMBED], "pause_before_rename:/embeddings/random")
    try:
        _wait_stopped(first)  # holding the first slide's lock, its array complete, not renamed
        code, out, err = run_cli(["embed", str(root), *EMBED])  # a second job meanwhile
        assert code == 1 and "1 embedded, 0 already complete, 1 busy" in out
        assert f"is being written by pid {first.pid} on " in err
    finally:
        first.kill()
        first.wait()
    code, out = _check(root)
    assert code == 1 and "unfinished embeddings (a job was killed)" in out
    assert len(open_store(root).slide_ids) == 2  # never a half-written array under its name
    code, out, _ = run_cli(["embed", str(root), *EMBED])
    assert code == 0 and "0 failed" in out
    code, out = _check(root)  # the index still holds the first embedding run's vectors
    assert code == 1 and out.count("problem: ") == 1 and "2 indexed slide(s) changed" in out
    assert run_cli(["index", str(root), "--add", "--quiet"])[0] == 0
    assert _check(root)[0] == 0
    got = _vectors(root)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_embed_full_disk_at_the_swap_keeps_the_old_array(
    small_archive: Path, tmp_path: Path
) -> None:
    want = _vectors(small_archive)
    root = shutil.copytree(small_archive, tmp_path / "root")
    job = _cli_process(
        ["embed", str(root), *EMBED, "--no-resume"], "enospc_before_rename:/embeddings/random"
    )
    _, err = job.communicate(timeout=300)
    assert job.returncode == 1 and b"No space left on device" in err
    got = _vectors(root)  # the previous complete arrays, whole
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert _check(root)[0] == 0


@pytest.mark.slow
def test_index_killed_at_the_manifest_then_rebuilt(small_archive: Path, tmp_path: Path) -> None:
    from wsi_ssl.storage.index_files import read_index

    root = shutil.copytree(small_archive, tmp_path / "root")
    [name] = [p.name for p in (root / "index").iterdir()]
    before = read_index(root, name)[1].path.name
    job = _cli_process(
        ["index", str(root), "--encoder", "random-cnn", "--quiet"],
        "kill_before_rename:MANIFEST.json",
    )
    job.wait(timeout=300)
    assert job.returncode == -signal.SIGKILL
    assert read_index(root, name)[1].path.name == before  # the previous index, whole
    code, out = _check(root)
    assert code == 1 and "orphan generation of a killed writer" in out
    assert "temp file of a killed writer" in out
    code, _, err = run_cli(["index", str(root), "--encoder", "random-cnn", "--quiet"])
    assert code == 0, err
    assert read_index(root, name)[1].path.name != before
    assert _check(root)[0] == 0


def test_index_second_writer_is_refused_while_the_first_holds_it(
    small_archive: Path, tmp_path: Path
) -> None:
    from wsi_ssl.storage.index_files import read_index

    root = shutil.copytree(small_archive, tmp_path / "root")
    [name] = [p.name for p in (root / "index").iterdir()]
    before = read_index(root, name)[1].path.name
    argv = ["index", str(root), "--encoder", "random-cnn", "--quiet"]
    first = _cli_process(argv, "pause_before_rename:MANIFEST.json")
    try:
        _wait_stopped(first)  # paused at its manifest rename, holding the index lock
        code, _, err = run_cli(argv)
        assert code == 1 and f"pid {first.pid}" in err and len(err.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait(timeout=60)
    assert read_index(root, name)[1].path.name == before  # the previous index, whole
    code, _, err = run_cli(argv)
    assert code == 0, err
    assert _check(root)[0] == 0


@pytest.mark.slow
def test_export_full_disk_never_leaves_features_without_coords(
    small_archive: Path, tmp_path: Path
) -> None:
    root, out = small_archive, tmp_path / "pt"
    argv = ["export", str(root), "--out", str(out), "--format", "pt"]
    job = _cli_process(argv, "enospc_before_rename:s1.pt")
    _, err = job.communicate(timeout=300)
    assert job.returncode == 1 and b"no space left on device" in err
    assert not (out / "s1.pt").exists() and not (out / "coords" / "s1.pt").exists()
    assert (out / "s2.pt").exists() and (out / "coords" / "s2.pt").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    code, _, _ = run_cli(argv)
    assert code == 0 and (out / "s1.pt").exists() and (out / "coords" / "s1.pt").exists()


@pytest.mark.slow
def test_export_killed_at_a_rename_never_leaves_features_without_coords(
    small_archive: Path, tmp_path: Path
) -> None:
    root, out = small_archive, tmp_path / "pt"
    argv = ["export", str(root), "--out", str(out), "--format", "pt"]
    job = _cli_process(argv, "kill_before_rename:s1.pt")
    job.communicate(timeout=300)
    assert job.returncode == -signal.SIGKILL
    assert not (out / "s1.pt").exists()  # coords may be there; features never without them
    code, _, _ = run_cli(argv)
    assert code == 0 and (out / "s1.pt").exists() and (out / "coords" / "s1.pt").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


_SAVE = """
import sys, torch
from wsi_ssl.ssl.checkpoint import save_checkpoint
save_checkpoint(sys.argv[1], {"meta": {"step": int(sys.argv[2])}, "w": torch.full((256,), 1.0)})
"""


def test_checkpoint_killed_at_the_rename_keeps_the_previous_one(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "step_00000001.pt"

    def save(step: int, fault: str = "") -> int:
        env = {**os.environ, FAULT_ENV: fault}
        return subprocess.run(
            [sys.executable, "-c", _SAVE, str(path), str(step)], env=env
        ).returncode

    assert save(1) == 0
    assert save(2, "kill_before_rename:step_00000001.pt") == -signal.SIGKILL
    assert torch.load(path, weights_only=True)["meta"]["step"] == 1  # the previous one, whole
    [temp] = [p for p in tmp_path.iterdir() if p != path]
    assert save(3) == 0  # the next save removes the dead run's temp file
    assert torch.load(path, weights_only=True)["meta"]["step"] == 3
    assert not temp.exists() and list(tmp_path.iterdir()) == [path]


def _interrupt_at(argv: list[str], fault: str) -> tuple[int, str, str]:
    """``wsi-ssl ARGV`` in a real process, Ctrl-C (SIGINT) where the fault hook pauses it:
    (exit code, stdout, stderr)."""
    code = "import sys; from wsi_ssl.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        env={**os.environ, FAULT_ENV: fault},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_stopped(proc)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, out, err


RESUME = "wsi-ssl: interrupted; re-run it (without --no-resume) to go on where it stopped"


def test_an_interrupted_embed_reports_the_slides_it_finished(
    small_archive: Path, tmp_path: Path
) -> None:
    """Ctrl-C while the second slide's vectors are about to land: the report names the first
    slide embedded and the second not done (it printed nothing but the advice); the re-run
    embeds only the second."""
    root = shutil.copytree(small_archive, tmp_path / "root")
    for store in (root / "slides").glob("*.zarr"):
        shutil.rmtree(store / "embeddings")
    a, b = open_store(root).slide_ids
    code, out, err = _interrupt_at(
        ["embed", str(root), *EMBED], f"pause_before_rename:{b}.zarr/embeddings/random"
    )
    assert code == 130 and err.strip().splitlines()[-1] == RESUME
    lines = out.strip().splitlines()
    name = Path(open_store(root).slide(a).source["path"]).name  # the report names its file
    assert lines[0].startswith("complete ") and lines[0].endswith(f"  {a} ({name})"), out
    assert (
        "1 embedded, 0 already complete, 0 busy (another job is writing or re-tiled them; run again), 0 failed"
        in out
    )
    assert lines[-1] == f"not done: 1 slide(s) when interrupted ({b})"
    assert open_store(root).embedding_ids(b) == []  # nothing half-written under its name
    code, out, _ = run_cli(["embed", str(root), *EMBED[:-1], "--json"])
    assert code == 0
    done = json.loads(out)
    assert (done["complete"], done["skipped"]) == (1, 1)


def test_an_interrupted_tile_job_reports_the_slides_it_finished(tmp_path: Path) -> None:
    """Ctrl-C in the second of three slides: the first is reported complete, the other two
    not done, in the ``--json`` output too; the re-run skips the first and tiles the rest."""
    folder = tmp_path / "slides"
    folder.mkdir()
    paths = [write_synthetic_slide(folder / f"s{i}.tiff", (900, 700), seed=i) for i in (1, 2, 3)]
    second = slide_id_from_fingerprint(fingerprint_file(paths[1]))
    root = tmp_path / "root"
    argv = ["tile", str(folder), "--out", str(root), "--tissue-threshold", "0", "--quiet"]
    code, out, err = _interrupt_at([*argv, "--json"], f"pause_before_rename:{second}.zarr")
    assert code == 130 and err.strip().splitlines()[-1] == RESUME
    report = json.loads(out)
    assert report["interrupted"] is True and report["complete"] == 1
    assert [s["path"] for s in report["slides"]] == [str(paths[0])]
    assert report["not_done"] == [str(p) for p in paths[1:]]
    code, out, _ = run_cli([*argv, "--json"])
    assert code == 0
    again = json.loads(out)
    assert (again["complete"], again["skipped"]) == (2, 1)
