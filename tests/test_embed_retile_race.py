"""A slide re-tiled (or re-flagged by new QC thresholds) by `wsi-ssl tile` after `wsi-ssl
embed` planned it, before the embed took its lock: the job reports it busy (exit 1) and writes
nothing from the tiles it read before, and a re-run embeds the new tiles (real processes:
the embed is paused at an earlier slide's commit by the WSI_SSL_FAULT hook, the re-tile runs
in the test's process, then the embed goes on)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from wsi_ssl.config import TilingConfig
from wsi_ssl.embedding import embed
from wsi_ssl.encoders import create_encoder
from wsi_ssl.outcome import STATUSES
from wsi_ssl.storage import open_store
from wsi_ssl.storage.embeddings import embedding_status, read_embeddings
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide
from wsi_ssl.tiling.qc import kept_tiles

TILING = TilingConfig(tile_size=64, tiles_per_chunk=4, tissue_threshold=0.0)
JOB = {"resize": "bilinear", "device": "cpu", "workers": 0, "batch_size": 16}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """Two synthetic slides tiled at 64 px (JPEG 90): the archive and each slide's file by
    slide id."""
    return tile_two_slides(tmp_path_factory.mktemp("retile_race"))


def tile_two_slides(base: Path) -> tuple[Path, dict[str, Path]]:
    """Two synthetic slides written in ``base`` and tiled with :data:`TILING` into
    ``base/root``: the archive and each slide's file by slide id."""
    files = {}
    for seed, size in ((1, (512, 384)), (2, (640, 512))):
        path = write_synthetic_slide(base / f"s{seed}.tiff", size, seed=seed)
        files[tile_slide(path, base / "root", TILING).details["slide_id"]] = path
    return base / "root", files


def _stopped(pid: int) -> bool:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0] == "T"


def _embed_while(
    root: Path, last_file: Path, change: TilingConfig, flags: list[str]
) -> tuple[int, str, str]:
    """Run `wsi-ssl embed` with ``flags``, paused at the first slide's commit while the last
    slide (``last_file``) is tiled again with ``change``; its exit code and output."""
    first = open_store(root).slide_ids[0]
    argv = [
        sys.executable, "-m", "wsi_ssl.cli.main", "embed", str(root), "--encoder", "random-cnn",
        "--resize", "bilinear", "--device", "cpu", "--batch-size", "16",
        "--quiet", *flags,
    ]  # fmt: skip
    fault = f"pause_before_rename:{root}/slides/{first}.zarr/embeddings/"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WSI_SSL_FAULT": fault}
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not _stopped(proc.pid):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.3)  # a loader worker reads the last slide's first batches meanwhile
        tile_slide(last_file, root, change)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def _check_busy_and_rerun(root: Path, code: int, out: str, err: str, **job: object) -> np.ndarray:
    """The last slide busy (re-tiled), nothing written for it, `check` clean; a re-run
    embeds it to the vectors a fresh job makes of the new store (returned)."""
    first, last = open_store(root).slide_ids
    eid = create_encoder("random-cnn", resize="bilinear").encoder_id
    lines = [line.split() + [""] * 5 for line in out.splitlines()]  # status, n, tiles, s, id
    status = {w[4]: w[0] for w in lines if w[0] in STATUSES and w[4] in (first, last)}
    assert code == 1, out + err
    assert status == {first: "complete", last: "busy"}, out
    assert "was re-tiled (or its tiles re-flagged by QC) by another job" in out, out
    store = open_store(root).slide(last)
    assert embedding_status(store, eid) == "missing"  # no array, no partial one
    check, report, _ = run_cli(["check", str(root)])
    assert check == 0 and report.strip().endswith(" 0 problem(s)"), report
    again = embed(root, "random-cnn", **JOB, **job)
    assert [(o.slide, o.status) for o in again.outcomes] == [(first, "skipped"), (last, "complete")]
    vectors = read_embeddings(open_store(root).slide(last), eid).features
    fresh = embed(root, "random-cnn", slides=[last], resume=False, **JOB, **job)
    assert [o.status for o in fresh.outcomes] == ["complete"]
    made = read_embeddings(open_store(root).slide(last), eid).features
    assert np.array_equal(vectors, made, equal_nan=True)
    return np.asarray(vectors)


@pytest.mark.faults
def test_a_slide_retiled_with_the_same_coordinates_mid_job_is_busy(
    archive: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    """The worst case: other JPEG quality, same coordinates and tile count; batches of the
    old tiles read before the lock would otherwise be committed to the new store."""
    root = Path(shutil.copytree(archive[0], tmp_path / "root"))
    last = open_store(root).slide_ids[-1]
    before = open_store(root).slide(last)
    n, coords = before.n_tiles, before.coords
    retile = dataclasses.replace(TILING, jpeg_quality=50)
    code, out, err = _embed_while(root, archive[1][last], retile, ["--workers", "1"])
    after = open_store(root).slide(last)
    assert after.tiling["jpeg_quality"] == 50  # re-tiled: same tiles, other bytes
    assert after.n_tiles == n and np.array_equal(after.coords, coords)
    _check_busy_and_rerun(root, code, out, err)


@pytest.mark.faults
def test_a_slide_reflagged_by_new_qc_thresholds_mid_job_is_busy(
    archive: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    """A resumed `tile` with other QC thresholds rewrites them in place (no swap): a job that
    skips flagged tiles would otherwise encode the tiles the old ones kept (9 of 48 here, 23
    pass the new ones)."""
    root = Path(shutil.copytree(archive[0], tmp_path / "root"))
    last = open_store(root).slide_ids[-1]
    kept = kept_tiles(open_store(root).slide(last))
    looser = dataclasses.replace(TILING, qc_min_focus=18.0, qc_min_tissue=0.0)
    flags = ["--workers", "1", "--skip-flagged-tiles"]
    code, out, err = _embed_while(root, archive[1][last], looser, flags)
    store = open_store(root).slide(last)
    assert (store.tiling["qc_min_focus"], store.tiling["qc_min_tissue"]) == (18.0, 0.0)
    now = kept_tiles(store)
    assert 0 < kept.sum() < now.sum() < len(now)  # the planned tile list is stale
    vectors = _check_busy_and_rerun(root, code, out, err, skip_flagged_tiles=True)
    assert np.array_equal(~np.isnan(vectors).all(axis=1), now)  # the new thresholds' tiles


@pytest.mark.faults
def test_a_slide_retiled_to_fewer_tiles_mid_job_is_busy_not_unreadable(
    archive: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    """Re-tiled at 128 px, the store has fewer tiles than planned: the job's first read of
    them (no loader worker: after the re-tile) fails, and the slide is reported busy, not
    as tiles that cannot be read."""
    root = Path(shutil.copytree(archive[0], tmp_path / "root"))
    last = open_store(root).slide_ids[-1]
    n = open_store(root).slide(last).n_tiles
    retile = dataclasses.replace(TILING, tile_size=128)
    code, out, err = _embed_while(root, archive[1][last], retile, ["--workers", "0"])
    assert open_store(root).slide(last).n_tiles < n
    assert "TileReadError" not in out
    _check_busy_and_rerun(root, code, out, err)
