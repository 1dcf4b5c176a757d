"""``export`` onto a full disk: each slide whose bag file meets it fails with a
``DiskFullError`` naming the file, a full disk at ``export.json`` stops the job with one
line, and nothing half-written is left. The files are built in memory, so neither HDF5 (which
crashed the process) nor torch (an untyped ``RuntimeError``) writes to the full disk; checked
with the fault hook and, where this machine lets the tests mount one, a real full tmpfs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import mounted_tmpfs, run_cli

from wsi_ssl.embedding.mil_files import export
from wsi_ssl.storage.atomic import FAULT_ENV, TEMP_MARK
from wsi_ssl.testing.bags import write_bag_store

ENC = "enc-x"
A, B = "aa" + "0" * 14, "bb" + "0" * 14
ROWS = {A: 600, B: 500}  # 150 KB and 125 KB of float32 features: several pages each


@pytest.fixture()
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    rng = np.random.default_rng(0)
    for sid, name in ((A, "a.svs"), (B, "b.svs")):
        features = rng.random((ROWS[sid], 64)).astype(np.float32)
        write_bag_store(root, sid, features, encoder_id=ENC, name=name, dtype="float32")
    return root


def _left(out: Path) -> list[str]:
    """Every file under ``out``, relative, sorted (directories left out)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def _h5_features(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        assert f["coords"].shape == (f["features"].shape[0], 2)
        return np.asarray(f["features"])


def _cli(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``wsi-ssl`` in its own process (a crash of the writer must not take pytest down)."""
    cmd = [sys.executable, "-m", "wsi_ssl.cli.main", *argv]
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(("format", "bag"), [("clam-h5", "a.h5"), ("pt", "a.pt")])
def test_a_full_disk_at_a_bag_fails_that_slide_with_a_disk_full_error(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, format: str, bag: str
) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv(FAULT_ENV, f"enospc_before_rename:{out / bag}")
    result = export(archive, out, format=format)
    [failed] = result.failed
    assert (failed.slide, failed.error_type) == (A, "DiskFullError")
    assert failed.error is not None
    assert failed.error.startswith(f"{out / bag}: no space left on device; free space or write")
    assert [o.slide for o in result.exported] == [B]
    manifest = json.loads((out / "export.json").read_text())
    assert [r["error_type"] for r in manifest["errors"]] == ["DiskFullError"]
    if format == "clam-h5":
        assert _left(out) == ["b.h5", "export.json"]
        assert _h5_features(out / "b.h5").shape == (ROWS[B], 64)
    else:  # a's coords are whole; never its features without them
        assert _left(out) == ["b.pt", "coords/a.pt", "coords/b.pt", "export.json"]
        assert torch.load(out / "b.pt", weights_only=True).shape == (ROWS[B], 64)
        assert torch.load(out / "coords" / "b.pt", weights_only=True).dtype == torch.int64
    argv = ["export", str(archive), "--out", str(out), "--format", format, "--quiet"]
    code, stdout, err = run_cli(argv)
    assert code == 1 and "DiskFullError" in stdout, (stdout, err)
    assert err.splitlines() == [f"wsi-ssl: error: {failed.error}"]


def test_a_full_disk_at_the_manifest_stops_the_export_with_one_line(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv(FAULT_ENV, "enospc_before_rename:export.json")
    code, _, err = run_cli(["export", str(archive), "--out", str(out), "--quiet"])
    assert code == 2
    assert err.splitlines() == [
        f"wsi-ssl: error: {out / 'export.json'}: no space left on device; free space, then "
        "re-run the export (the bag files written are whole; export.json, which lists them, "
        "was not updated)"
    ]
    assert _left(out) == ["a.h5", "b.h5"]  # whole, and no temp file
    assert _h5_features(out / "a.h5").shape == (ROWS[A], 64)


def test_bags_built_in_memory_read_back_as_the_archive_holds_them(
    archive: Path, tmp_path: Path
) -> None:
    from wsi_ssl.storage import open_store
    from wsi_ssl.storage.embeddings import read_embeddings

    export(archive, tmp_path / "h5")
    export(archive, tmp_path / "pt", format="pt")
    for sid, name in ((A, "a"), (B, "b")):
        emb = read_embeddings(open_store(archive).slide(sid), ENC)
        want = np.asarray(emb.features, dtype=np.float32)
        with h5py.File(tmp_path / "h5" / f"{name}.h5", "r") as f:
            assert np.array_equal(f["features"][()], want)
            assert np.array_equal(f["coords"][()], np.asarray(emb.coords))
            assert f["features"].attrs["slide_id"] == sid and f.attrs["encoder_id"] == ENC
        got = torch.load(tmp_path / "pt" / f"{name}.pt", weights_only=True)
        coords = torch.load(tmp_path / "pt" / "coords" / f"{name}.pt", weights_only=True)
        assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want)
        assert coords.dtype == torch.int64 and np.array_equal(coords.numpy(), emb.coords)


def test_export_onto_a_real_full_disk(archive: Path, tmp_path: Path) -> None:
    """A tmpfs with room for a.h5 but not then for b.h5: the export ends (no crash), a.h5
    reads back, b fails with a DiskFullError naming b.h5, no temp file is left."""
    ref = tmp_path / "ref"
    export(archive, ref)
    page = os.sysconf("SC_PAGE_SIZE")
    pages = {n: math.ceil((ref / n).stat().st_size / page) for n in ("a.h5", "b.h5")}
    assert pages["b.h5"] >= 2  # room left after a.h5 for export.json, not for b.h5
    size = (pages["a.h5"] + pages["b.h5"] - 1) * page
    with mounted_tmpfs(tmp_path / "tiny", f"{size // 1024}k") as disk:
        out = disk / "out"
        done = _cli(["export", str(archive), "--out", str(out), "--json"])
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
        [error] = json.loads(done.stdout)["errors"]
        assert error["error_type"] == "DiskFullError"
        assert error["error"].startswith(f"{out / 'b.h5'}: no space left on device")
        assert _left(out) == ["a.h5", "export.json"] and TEMP_MARK not in "".join(_left(out))
        assert np.array_equal(_h5_features(out / "a.h5"), _h5_features(ref / "a.h5"))


@pytest.mark.parametrize("format", ["clam-h5", "pt"])
def test_export_onto_a_real_disk_with_no_room_left(
    archive: Path, tmp_path: Path, format: str
) -> None:
    """Every write fails: one line naming export.json, exit 2, no bag and no temp file."""
    with mounted_tmpfs(tmp_path / "tiny", "1m") as disk:
        with pytest.raises(OSError), open(disk / "filler", "wb") as f:
            f.write(b"\0" * (2 << 20))
        out = disk / "out"
        done = _cli(["export", str(archive), "--out", str(out), "--format", format, "--quiet"])
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines() == [
            f"wsi-ssl: error: {out / 'export.json'}: no space left on device; free space, then "
            "re-run the export (the bag files written are whole; export.json, which lists "
            "them, was not updated)"
        ]
        assert _left(out) == []
