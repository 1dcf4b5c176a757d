"""An archive that cannot be written (a full disk, a read-only mount): the catalog's sqlite
errors are typed errors naming ``catalog.sqlite`` and what to do (they escaped raw, and a
full catalog was blamed on the slide file), ``check --repair`` rebuilds a catalog at once or
not at all, and a repair the archive refuses says so once instead of advising itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from wsi_ssl.errors import CatalogWriteError
from wsi_ssl.storage import open_store
from wsi_ssl.storage.atomic import FAULT_ENV, host_name
from wsi_ssl.storage.catalog import Catalog
from wsi_ssl.synthetic import write_synthetic_slide

pytestmark = pytest.mark.faults

FLAGS = ["--tissue-threshold", "0", "--tiles-per-chunk", "4", "--quiet"]


def _fill(folder: Path) -> Path:
    """Write into ``folder`` until its disk is full; the file written."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def _wait_stopped(proc: subprocess.Popen[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the process never reached the fault point")


def _tiled(root: Path, tmp_path: Path, seed: int) -> tuple[Path, str]:
    slide = write_synthetic_slide(tmp_path / f"s{seed}.tiff", (1200, 900), seed=seed)
    code, out, err = run_cli(["tile", str(slide), "--out", str(root), *FLAGS, "--json"])
    assert code == 0, (out, err)
    return slide, json.loads(out)["slides"][0]["slide_id"]


def test_a_full_disk_at_the_catalog_row_is_a_disk_full_error_naming_the_catalog(
    tiny_disk: Path, tmp_path: Path
) -> None:
    """The store fits, its catalog row does not (the disk fills between them): the slide fails
    with a DiskFullError naming catalog.sqlite, never blamed on the slide file; once space is
    freed a re-run adds the row."""
    _tiled(tiny_disk, tmp_path, seed=1)  # the catalog exists
    slide = write_synthetic_slide(tmp_path / "t.tiff", (1200, 900), seed=2)
    argv = [sys.executable, "-m", "wsi_ssl.cli.main", "tile", str(slide), "--out", str(tiny_disk)]
    env = {**os.environ, FAULT_ENV: "pause_before_rename:#swap-in"}
    proc = subprocess.Popen(
        [*argv, *FLAGS, "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_stopped(proc)  # its store is complete, not yet renamed into place
        filler = _fill(tiny_disk)
    finally:
        proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    [failed] = json.loads(out)["slides"]
    assert proc.returncode == 1 and failed["error_type"] == "DiskFullError", (out, err)
    catalog = tiny_disk / "catalog.sqlite"
    assert failed["error"].startswith(f"{catalog}: no space left on device;"), failed["error"]
    assert "free space, then re-run" in failed["error"]
    assert "malformed" not in out + err and "QuPath" not in out + err
    assert "OperationalError" not in out + err
    filler.unlink()
    code, out, err = run_cli(["tile", str(slide), "--out", str(tiny_disk), *FLAGS])
    assert code == 0 and "1 already complete" in out, (out, err)
    assert len(open_store(tiny_disk).catalog.entries()) == 2
    assert run_cli(["check", str(tiny_disk)])[0] == 0


def test_repair_of_a_lost_catalog_on_a_full_disk_writes_it_whole_or_not_at_all(
    tiny_disk: Path, tmp_path: Path
) -> None:
    """The rebuild wrote in place: a full disk left a 0-byte catalog and a raw sqlite error
    (exit 2), and plain check crashed the same way after. Now nothing is left, the finding says
    to free space, and once there is space the repair rebuilds it."""
    _, slide_id = _tiled(tiny_disk, tmp_path, seed=1)
    catalog = tiny_disk / "catalog.sqlite"
    catalog.unlink()
    filler = _fill(tiny_disk)
    code, out, err = run_cli(["check", str(tiny_disk), "--repair"])
    assert code == 1 and err == "", (out, err)
    assert f"problem: {catalog}: missing (1 complete store(s))" in out
    assert "not repaired (No space left on device): free space on the archive's disk" in out
    assert sorted(p.name for p in tiny_disk.iterdir()) == [".locks", "filler", "slides"]
    code, out, err = run_cli(["check", str(tiny_disk)])  # a reader creates nothing either
    assert code == 1 and err == "" and f"problem: {catalog}: missing" in out, (out, err)
    assert not catalog.exists()
    filler.unlink()
    code, out, _ = run_cli(["check", str(tiny_disk), "--repair"])
    assert code == 0 and f"repaired: {catalog}: missing" in out, out
    assert [e.slide_id for e in open_store(tiny_disk).catalog.entries()] == [slide_id]


def test_a_rebuild_cut_at_its_rename_leaves_the_damaged_catalog_in_place(
    small_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rebuilt catalog is written beside the damaged one and renamed over it: a full disk
    at the rename keeps the damaged file where it was (not set aside, nothing half-written),
    leaves no temp file, and says to free space."""
    import shutil

    root = shutil.copytree(small_archive, tmp_path / "root")
    catalog = root / "catalog.sqlite"
    catalog.write_bytes(catalog.read_bytes()[:3000])
    damaged = catalog.read_bytes()
    monkeypatch.setenv(FAULT_ENV, "enospc_before_rename:catalog.sqlite")
    code, out, err = run_cli(["check", str(root), "--quick", "--repair"])
    assert code == 1 and err == "", (out, err)
    assert f"problem: {catalog}: damaged" in out and "not repaired (No space left" in out
    assert catalog.read_bytes() == damaged
    assert sorted(p.name for p in root.iterdir() if "catalog" in p.name) == ["catalog.sqlite"]
    monkeypatch.delenv(FAULT_ENV)
    code, out, _ = run_cli(["check", str(root), "--quick", "--repair"])
    assert code == 0 and f"repaired: {catalog}: damaged" in out, out
    assert len(open_store(root).catalog.entries()) == 2


def test_a_read_only_archive_without_a_catalog_is_read_not_refused(
    tiny_disk: Path, tmp_path: Path
) -> None:
    """Opening the catalog created its table, so reading a missing one on a read-only mount
    was a raw "unable to open database file"; writing it is a typed error naming the catalog."""
    _tiled(tiny_disk, tmp_path, seed=1)
    (tiny_disk / "catalog.sqlite").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    assert open_store(tiny_disk).catalog.entries() == []
    code, out, err = run_cli(["check", str(tiny_disk)])
    assert code == 1 and err == "" and "catalog.sqlite: missing (1 complete store(s))" in out
    catalog = Catalog(tiny_disk / "catalog.sqlite")
    with pytest.raises(CatalogWriteError, match=r"catalog\.sqlite: cannot write the archive's "):
        catalog.upsert(slide_id="0" * 16, path="x.tiff", fingerprint="0" * 64, status="failed")
    with pytest.raises(CatalogWriteError, match=r"\(Read-only file system\)"):
        catalog.upsert(slide_id="0" * 16, path="x.tiff", fingerprint="0" * 64, status="failed")


def test_repair_on_a_read_only_archive_says_so_once_and_does_not_advise_itself(
    tiny_disk: Path, tmp_path: Path
) -> None:
    """A killed embed's leftover and a dead writer's temp file on a read-only mount: each
    finding's fix waits for the archive to be writable, and one finding says it is read-only
    (it printed `fix: wsi-ssl check ROOT --repair` and never said why that could not work)."""
    _, slide_id = _tiled(tiny_disk, tmp_path, seed=1)
    leftover = tiny_disk / "slides" / f"{slide_id}.zarr" / "embeddings" / ".writing-random-cnn"
    leftover.mkdir(parents=True)
    (leftover / "zarr.json").write_text("{}")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    )
    temp = tiny_disk / f".catalog.tmp-{int(dead.stdout)}-{host_name()}-0123abcd"
    temp.write_text("{}")
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    code, out, err = run_cli(["check", str(tiny_disk), "--repair"])
    assert code == 1 and err == "", (out, err)
    assert f"problem: {leftover}: unfinished embeddings" in out
    assert f"problem: {temp}: temp file of a killed writer" in out
    assert out.count("once the archive is writable") == 2, out
    assert out.count("read-only") == 1, out
    assert f"problem: {tiny_disk}: the archive is read-only (Read-only file system)" in out
    assert f"    fix: wsi-ssl check {tiny_disk} --repair\n" not in out
    assert leftover.exists() and temp.exists()
