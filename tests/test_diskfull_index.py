"""An index build that fills the disk after its new generation is renamed in, at the
manifest: the new generation is removed with the temp files (it said "the unfinished output
was removed" but left ``g-00000N``, which ``check`` then called an orphan of a killed
writer), the previous complete generation is kept and still served."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from wsi_ssl.storage.atomic import FAULT_ENV
from wsi_ssl.storage.index_files import read_index


def test_a_full_disk_at_the_manifest_removes_the_new_generation(
    small_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = shutil.copytree(small_archive, tmp_path / "root")
    [name] = [p.name for p in (root / "index").iterdir()]
    folder = root / "index" / name
    before_index, before = read_index(root, name)
    listing = sorted(p.name for p in folder.iterdir())
    assert before.path.name in listing
    monkeypatch.setenv(FAULT_ENV, "enospc_before_rename:MANIFEST.json")
    code, _, err = run_cli(["index", str(root), "--encoder", "random-cnn", "--quiet"])
    assert code == 2 and err.splitlines() == [
        f"wsi-ssl: error: {folder}: no space left on device; free space or write elsewhere, "
        "then re-run (the unfinished output was removed)"
    ]
    monkeypatch.delenv(FAULT_ENV)
    assert sorted(p.name for p in folder.iterdir()) == listing  # no g-00000N beside it
    index, files = read_index(root, name, verify=True)  # the previous generation, served
    assert files.path.name == before.path.name and index.ntotal == before_index.ntotal > 0
    assert np.array_equal(files.coords, before.coords) and files.slides == before.slides
    code, out, _ = run_cli(["check", str(root)])
    assert code == 0 and "orphan generation" not in out, out
    code, _, err = run_cli(["index", str(root), "--encoder", "random-cnn", "--quiet"])
    assert code == 0, err
    assert read_index(root, name)[1].path.name != before.path.name
