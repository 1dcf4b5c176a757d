"""A tile job killed outright (SIGKILL, the OOM killer) leaves no task that writes later:

* its local worker processes (``--scheduler processes``) die with it (they lived on, one
  paused before renaming its shard, and wrote it into the next job's ``<id>.zarr.new``, which
  that job then marked complete);
* a task of a job that no longer owns the store's output (a cluster's worker, or any task
  outliving its job) reads and writes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import StaleWriterError
from wsi_ssl.slide import open_slide
from wsi_ssl.storage import open_store
from wsi_ssl.storage.writer_token import WRITER_FILE, check_still_ours, claim
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide
from wsi_ssl.tiling.extract import _extract_chunk
from wsi_ssl.tiling.grid import TileGrid

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, and by those, and so on."""
    found, todo = [], [pid]
    while todo:
        children = _children(todo.pop())
        found += children
        todo += children
    return found


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (or is stopped); a zombie or a gone process is not alive."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_worker_processes_die_with_a_killed_job(tmp_path: Path, context: str) -> None:
    """Killed as its shards land (spawn: one worker paused before its shard's rename, so one
    is caught mid-write). Under a forkserver the workers are its children and it waits for
    them: they lived on (the parent-death signal waits for the forkserver). There each shard's
    rename is slowed, so the job is still writing when the test sees its first shard."""
    slide = write_synthetic_slide(tmp_path / "s.tiff", (1536, 1024), seed=2)
    out = tmp_path / "root"
    env = {**os.environ, "DASK_MULTIPROCESSING__CONTEXT": context}
    # spawn: a stopped worker, which only the parent-death signal ends; forkserver: the
    # workers' watcher threads end them (a stopped one there is a known gap)
    action = "pause" if context == "spawn" else "slow"
    env["WSI_SSL_FAULT"] = f"{action}_before_rename:/tiles/c/"
    argv = [sys.executable, "-m", "wsi_ssl.cli", "tile", str(slide), "--out", str(out)]
    argv += ["--tile-size", "32", "--tiles-per-chunk", "8", "--no-qc", "--quiet"]
    job = subprocess.Popen([*argv, "--scheduler", "processes", "--workers", "2"], env=env)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("slides/*.zarr.new/tiles/c/**/.*.partial")):
            assert job.poll() is None and time.monotonic() < deadline, "no shard written"
            time.sleep(0.05)
        workers = [p for p in _descendants(job.pid) if _alive(p)]
        assert workers
        job.send_signal(signal.SIGKILL)
        job.wait(10)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [p for p in workers if _alive(p)] == []  # the paused one too
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if job.poll() is None:
            job.kill()
    assert tile_slide(slide, out, TilingConfig(tile_size=32)).status == "complete"
    store = open_store(out).slide(open_store(out).slide_ids[0])
    assert not (store.path / "tiles" / WRITER_FILE).exists()  # the job's mark is removed


def test_a_task_of_a_job_that_no_longer_writes_the_store_writes_nothing(tmp_path: Path) -> None:
    slide = write_synthetic_slide(tmp_path / "s.tiff", (1024, 768), seed=3)
    config = TilingConfig(tile_size=128, tiles_per_chunk=8, codec="zstd")
    tile_slide(slide, tmp_path / "root", config)
    store = open_store(tmp_path / "root").slide(open_store(tmp_path / "root").slide_ids[0])
    tiles_path = store.path / "tiles"
    before = store.tiles[:8].copy()
    shard = next(p for p in (tiles_path / "c").rglob("*") if p.is_file())
    data = shard.read_bytes()
    with open_slide(slide) as reader:
        grid = TileGrid.for_slide(reader, reader.require_mpp(), config)
    args = ((str(slide), "openslide"), str(tiles_path), grid, 0, store.coords[:8][::-1])
    claim(tiles_path, "the-job-writing-it-now")
    with pytest.raises(StaleWriterError, match="written by another tile job now"):
        _extract_chunk(*args, job="a-job-killed-earlier")
    assert shard.read_bytes() == data
    np.testing.assert_array_equal(
        open_store(tmp_path / "root").slide(store.slide_id).tiles[:8], before
    )
    start, n, _, _ = _extract_chunk(*args, job="the-job-writing-it-now")  # its own job writes
    assert (start, n) == (0, 8) and shard.read_bytes() != data


def test_a_worker_that_cannot_read_the_token_says_why(tmp_path: Path) -> None:
    """No token where the job wrote it: the job's output is gone, or the worker sees the
    archive elsewhere (it was reported as "being written by another process")."""
    with pytest.raises(StaleWriterError, match="does not see the archive at this path"):
        check_still_ours(tmp_path / "tiles", "a-job")


def test_worker_processes_start_under_a_forkserver_too(tmp_path: Path) -> None:
    """Dask configured for the forkserver context: a worker's parent is the forkserver, not
    the job, and the workers must still run (each exited at start: BrokenProcessPool)."""
    slide = write_synthetic_slide(tmp_path / "s.tiff", (768, 512), seed=4)
    env = {**os.environ, "DASK_MULTIPROCESSING__CONTEXT": "forkserver"}
    argv = [sys.executable, "-m", "wsi_ssl.cli", "tile", str(slide), "--out", str(tmp_path / "o")]
    argv += ["--tile-size", "128", "--no-qc", "--quiet", "--scheduler", "processes"]
    done = subprocess.run([*argv, "--workers", "2"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    store = open_store(tmp_path / "o").slide(open_store(tmp_path / "o").slide_ids[0])
    assert store.status == "complete" and store.n_tiles > 0
