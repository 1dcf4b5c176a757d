"""``wsi-ssl serve ROOT`` when the index it opens without ``--index`` is damaged: it refused
with the damage alone, though another index of the archive served fine with ``--index``.
Now the refusal names the archive's intact indexes and the ``--index`` that serves one; the
default choice itself is unchanged. Real archive, real CLI and a real server process."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import copy_two_slides, run_cli
from wsi_ssl.serve.indexes import default_index
from wsi_ssl.storage.index_files import list_indexes

pytest.importorskip("uvicorn")


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)


def _faiss_file(root: Path, name: str) -> Path:
    (path,) = (root / "index" / name).glob("g-*/index.faiss")
    return path


def test_a_damaged_default_index_is_refused_naming_the_intact_one(
    small_archive: Path, tmp_path: Path
) -> None:
    root, _, _ = copy_two_slides(small_archive, tmp_path)
    (eid,) = list_indexes(root)
    code, _, err = run_cli(["index", str(root), "--encoder", eid, "--name", "other", "--quiet"])
    assert code == 0, err
    chosen = default_index(root)
    assert chosen is not None and (chosen.name, chosen.reason) == (
        "other",
        "the most recently built",
    )
    _flip_byte(_faiss_file(root, "other"), 150)

    code, out, err = run_cli(["serve", str(root), "--port", "0"])
    assert code == 2 and out == ""
    assert err.startswith("wsi-ssl: error: ") and len(err.strip().splitlines()) == 1
    assert "other/" in err and "index.faiss: search index is corrupt" in err
    assert "serve opens index other when no --index names one (the most recently built)" in err
    assert err.rstrip().endswith(
        f"the archive's intact indexes: {eid} (`--index {eid}` serves it)"
    ), err

    # named explicitly, the damaged index is refused as before: no other one is offered
    code, _, err = run_cli(["serve", str(root), "--port", "0", "--index", "other"])
    assert code == 2 and "search index is corrupt" in err and "--index" not in err

    # the advice works: `--index EID` serves
    cmd = [sys.executable, "-m", "wsi_ssl.cli.main", "serve", str(root), "--port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--index", eid], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert first.startswith(f"serving index {eid} ("), first

    # no intact index left: the damage alone, no --index to suggest
    _flip_byte(_faiss_file(root, eid), 150)
    code, _, err = run_cli(["serve", str(root), "--port", "0"])
    assert code == 2 and "other/" in err and "search index is corrupt" in err
    assert "--index" not in err and "intact" not in err
