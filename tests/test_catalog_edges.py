"""Catalogs that this process can read but not write: a hot journal (an unfinished transaction
of a killed writer) on a read-only snapshot, which sqlite cannot read until it rolls it back,
and a catalog owned by another user, which is not a read-only archive."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import mounted_tmpfs, run_cli
from wsi_ssl.storage import open_store
from wsi_ssl.storage.atomic import host_name
from wsi_ssl.storage.check import check_archive
from wsi_ssl.synthetic import write_synthetic_slide

pytestmark = pytest.mark.faults

FLAGS = ["--tissue-threshold", "0", "--tiles-per-chunk", "4", "--quiet"]
JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")  # a journal sqlite must roll back (hot)

# A writer killed mid-transaction after sqlite spilled its cache into the database file: the
# journal holds the pages that roll it back (the catalog is half-written without it).
KILLED_WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size=2")
db.execute("BEGIN IMMEDIATE")
db.execute("UPDATE slides SET status = 'failed', error = 'half-written'")
for i in range(2000):
    db.execute("INSERT INTO slides VALUES (?, 'x', 'x', 'f', 'failed', 0, ?, NULL, 0)",
               (f"{i:016x}", "e" * 200))
print("ready", flush=True)
time.sleep(600)
"""

NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-all"]
"""This process (root) without the capabilities that let it write any file: file permissions
then refuse it what they refuse another user."""


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of our own, which the test can remount read-only."""
    with mounted_tmpfs(tmp_path / "mnt", "64m") as folder:
        yield folder


def _archive(root: Path, tmp_path: Path) -> list[str]:
    """Two slides tiled into ``root``; their slide ids."""
    ids = []
    for seed in (1, 2):
        slide = write_synthetic_slide(tmp_path / f"s{seed}.tiff", (1200, 900), seed=seed)
        code, out, err = run_cli(["tile", str(slide), "--out", str(root), *FLAGS, "--json"])
        assert code == 0, (out, err)
        ids.append(json.loads(out)["slides"][0]["slide_id"])
    return sorted(ids)


def _dead_temp(root: Path) -> Path:
    """A temp file of a writer that is dead (a finding of any check)."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    )
    temp = root / f".catalog.tmp-{int(dead.stdout)}-{host_name()}-0123abcd"
    temp.write_text("{}")
    return temp


def _kill_mid_transaction(catalog: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(catalog)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_hot_journal_on_a_read_only_snapshot_is_one_finding_and_the_rest_is_checked(
    mount: Path, tmp_path: Path
) -> None:
    """sqlite must roll a hot journal back before reading, which a read-only mount refuses:
    `wsi-ssl check` stopped at the catalog with a CatalogWriteError (exit 2, no store checked).
    Now it is one finding saying what to do, every store and temp file is still checked, and
    doing what it says (a check where the archive is writable) restores the catalog."""
    root = mount / "root"
    ids = _archive(root, tmp_path)
    catalog = root / "catalog.sqlite"
    shard = next(
        p for p in (root / "slides" / f"{ids[0]}.zarr" / "tiles" / "c").rglob("*") if p.is_file()
    )
    shard.unlink()
    temp = _dead_temp(root)
    _kill_mid_transaction(catalog)
    journal = Path(f"{catalog}-journal")
    assert journal.read_bytes()[:8] == JOURNAL_MAGIC  # hot: the database file was written
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)

    code, out, err = run_cli(["check", str(root), "--quick"])
    assert code == 1 and err == "", (out, err)
    assert (
        f"problem: {catalog}: an unfinished transaction of a killed writer (catalog.sqlite-journal)"
        " must be rolled back to read it: Read-only file system\n"
    ) in out, out
    assert f"fix: where the archive is writable, run: wsi-ssl check {root}" in out, out
    assert "never delete catalog.sqlite-journal" in out
    assert f"problem: {root / 'slides' / f'{ids[0]}.zarr'}: " in out  # stores still checked
    assert f"problem: {temp}: temp file of a killed writer" in out
    assert "checked 2 store(s), 0 embeddings array(s), 0 index(es): 3 problem(s)" in out

    report = check_archive(root, decode=False)  # the Python API: a report, not a raise
    assert report.stores == 2 and not report.ok
    assert [f.path for f in report.findings if "unfinished transaction" in f.problem] == [
        str(catalog)
    ]
    code, out, err = run_cli(["check", str(root), "--quick", "--repair"])
    assert code == 1 and err == "" and "unfinished transaction" in out, (out, err)
    assert journal.exists() and temp.exists()

    subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
    code, out, err = run_cli(["check", str(root), "--quick"])
    assert code == 1 and err == "" and "unfinished transaction" not in out, (out, err)
    assert not journal.exists()  # rolled back: the killed writer's rows are gone
    entries = open_store(root).catalog.entries()
    assert sorted(e.slide_id for e in entries) == ids
    assert {e.status for e in entries} == {"complete"}


def _no_dac_works() -> bool:
    try:
        done = subprocess.run([*NO_DAC, "true"], capture_output=True)
    except FileNotFoundError:
        return False
    return done.returncode == 0


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the archive to another user")
@pytest.mark.skipif(not _no_dac_works(), reason="setpriv cannot drop capabilities here")
def test_another_users_archive_is_permission_denied_not_read_only(tmp_path: Path) -> None:
    """An archive owned by another user: `check --repair` said "the archive is read-only
    (Permission denied)" and advised remounting it read-write; a catalog write said only
    "(Permission denied)". Both now name the file, its owner and what to do."""
    root = tmp_path / "root"
    ids = _archive(root, tmp_path)
    catalog = root / "catalog.sqlite"
    code, out, err = run_cli(["check", str(root), "--quick"])
    assert code == 0, (out, err)
    temp = _dead_temp(root)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(root)], check=True)
    owner = f"owned by user {pwd.getpwuid(NOBODY).pw_name}, uid {NOBODY}"

    check = [*NO_DAC, sys.executable, "-m", "wsi_ssl.cli.main", "check", str(root), "--quick"]
    done = subprocess.run([*check, "--repair"], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr == "", done
    assert "read-only" not in done.stdout and "remount" not in done.stdout, done.stdout
    assert f"problem: {temp}: temp file of a killed writer" in done.stdout
    assert f"problem: {root}: permission denied: {temp} is {owner}" in done.stdout, done.stdout
    assert "run as that user or fix its permissions, then: wsi-ssl check" in done.stdout
    assert temp.exists()

    write = (
        "from wsi_ssl.storage.catalog import Catalog\n"
        "from wsi_ssl.errors import CatalogWriteError\n"
        "try:\n"
        f"    Catalog({str(catalog)!r}).upsert(slide_id='0' * 16, path='x.tiff',"
        " fingerprint='0' * 64, status='failed')\n"
        "except CatalogWriteError as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run([*NO_DAC, sys.executable, "-c", write], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done
    assert done.stdout.startswith(
        f"{catalog}: cannot write the archive's catalog (Permission denied: {catalog} is {owner}:"
        " run as that user or fix its permissions)"
    ), done.stdout
    assert sorted(e.slide_id for e in open_store(root).catalog.entries()) == ids

    catalog.chmod(0o600)  # not even readable: one finding too, the stores still checked
    journal = root / "catalog.sqlite-journal"  # beside it, the fix is still the owner's
    journal.write_bytes(b"")
    subprocess.run(["chown", f"{NOBODY}:{NOBODY}", str(journal)], check=True)
    done = subprocess.run(check, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr == "", done
    assert f"problem: {catalog}: Permission denied: {catalog} is {owner}: run as" in done.stdout
    fix = f"fix: run as that user or fix its permissions, then: wsi-ssl check {root}\n"
    assert fix in done.stdout and "remounted" not in done.stdout, done.stdout
    assert "checked 2 store(s), 0 embeddings array(s), 0 index(es): 2 problem(s)" in done.stdout


def test_sqlite_asking_to_roll_a_hot_journal_back_is_said_so(tmp_path: Path) -> None:
    """sqlite's SQLITE_READONLY_ROLLBACK (a reader that must roll back a killed writer's
    journal first) is a CatalogWriteError that names the journal (no mount needed here)."""
    import sqlite3

    from wsi_ssl.errors import CatalogWriteError
    from wsi_ssl.storage.catalog import _typed

    err = sqlite3.OperationalError("attempt to write a readonly database")
    err.sqlite_errorcode = sqlite3.SQLITE_READONLY_ROLLBACK
    typed = _typed(tmp_path / "catalog.sqlite", err)
    assert isinstance(typed, CatalogWriteError)
    assert typed.reason == (
        "an unfinished transaction of a killed writer (catalog.sqlite-journal) must be rolled "
        "back to read it: attempt to write a readonly database"
    )
    plain = sqlite3.OperationalError("attempt to write a readonly database")
    plain.sqlite_errorcode = sqlite3.SQLITE_READONLY
    typed = _typed(tmp_path / "catalog.sqlite", plain)
    assert isinstance(typed, CatalogWriteError)
    assert typed.reason == "attempt to write a readonly database"
