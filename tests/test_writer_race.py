"""A task of a stopped tile job that passed its last token check lands no shard after a new
job took its store over: the takeover waits for it (same folder), or its shard goes to the
folder it checked, not to the one made afresh at that path. Real processes, no mocks."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import StaleWriterError
from wsi_ssl.slide import open_slide
from wsi_ssl.storage import open_store
from wsi_ssl.storage.shards import write_shard
from wsi_ssl.storage.writer_token import LOCK_FILE, WRITER_FILE, claim, release, writing
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide
from wsi_ssl.tiling.extract import _extract_chunk
from wsi_ssl.tiling.grid import TileGrid

STALE_TASK = """
import pickle, sys
from wsi_ssl.tiling.extract import _extract_chunk
with open(sys.argv[1], "rb") as f:
    args = pickle.load(f)
_extract_chunk(*args, job=sys.argv[2])
"""

HOLDER = """
import sys, time
from pathlib import Path
from typing import Any
from wsi_ssl.storage.writer_token import writing
tiles, job, ready, go = sys.argv[1:5]
with writing(tiles, job) as folder:
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.01)
    if len(sys.argv) > 5:
        exec(sys.argv[5])
"""

STALE_SHARD = """
import numpy as np
from wsi_ssl.storage.shards import write_shard
from wsi_ssl.storage.slide_store import open_tiles
stale = np.full((8, 32, 32, 3), 7, np.uint8)
write_shard(open_tiles(tiles, writable=True), 0, stale, folder=folder)
"""


def _tiled(tmp_path: Path) -> tuple[Path, Path, tuple[Any, ...]]:
    """A complete store; its tiles folder; the first chunk's task arguments (coords reversed:
    a task of another job writing other tiles into shard 0)."""
    slide = write_synthetic_slide(tmp_path / "s.tiff", (1024, 768), seed=3)
    config = TilingConfig(tile_size=128, tiles_per_chunk=8, codec="zstd")
    root = tmp_path / "root"
    tile_slide(slide, root, config)
    store = open_store(root).slide(open_store(root).slide_ids[0])
    with open_slide(slide) as reader:
        grid = TileGrid.for_slide(reader, reader.require_mpp(), config)
    args = ((str(slide), "openslide"), str(store.path / "tiles"), grid, 0, store.coords[:8])
    return root, store.path / "tiles", args


def _wait_for(path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "the child never got there"
        time.sleep(0.01)


def test_a_takeover_waits_for_a_stale_task_between_its_check_and_its_shard(
    tmp_path: Path,
) -> None:
    """The task of job A stops (SIGSTOP) after its last token check, its shard written but
    not yet renamed into place. Job B's claim must wait for it: no shard of A lands after the
    claim (it did: the claim returned at once and A's shard replaced the folder's afterwards).
    """
    root, tiles, args = _tiled(tmp_path)
    shard = tiles / "c" / "0" / "0" / "0" / "0"
    before = open_store(root).slide(open_store(root).slide_ids[0]).tiles[:8].copy()
    task = tmp_path / "task.pickle"
    task.write_bytes(pickle.dumps((*args[:4], args[4][::-1])))
    claim(tiles, "job-a")
    env = {**os.environ, "WSI_SSL_FAULT": "pause_before_rename:/tiles/c/"}
    stale = subprocess.Popen([sys.executable, "-c", STALE_TASK, str(task), "job-a"], env=env)
    at_claim: list[bytes] = []
    try:
        _, status = os.waitpid(stale.pid, os.WUNTRACED)  # until it stops before its rename
        assert os.WIFSTOPPED(status)

        def take_over() -> None:
            claim(tiles, "job-b")
            at_claim.append(shard.read_bytes())

        taker = threading.Thread(target=take_over)
        taker.start()
        taker.join(1.0)
        waited = taker.is_alive()
        os.kill(stale.pid, signal.SIGCONT)
        taker.join(60)
        assert stale.wait(60) == 0
    finally:
        if stale.poll() is None:
            stale.kill()
    assert waited and at_claim  # the claim waited for the task mid-write
    assert shard.read_bytes() == at_claim[0]  # ... so nothing of job A landed after it
    assert (tiles / WRITER_FILE).read_text() == "job-b"
    with pytest.raises(StaleWriterError, match="written by another tile job now"):
        _extract_chunk(*args[:4], args[4][::-1], job="job-a")
    assert shard.read_bytes() == at_claim[0]
    _extract_chunk(*args, job="job-b")  # the new job writes every shard of its grid
    np.testing.assert_array_equal(zarr.open_array(tiles, mode="r")[:8], before)


def test_a_claim_waits_for_a_writer_then_the_writer_s_job_writes_nothing(
    tmp_path: Path,
) -> None:
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    claim(tiles, "job-a")
    ready, go = tmp_path / "ready", tmp_path / "go"
    argv = [sys.executable, "-c", HOLDER, str(tiles), "job-a", str(ready), str(go)]
    holder = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        _wait_for(ready, holder)
        taker = threading.Thread(target=claim, args=(tiles, "job-b"))
        taker.start()
        taker.join(0.5)
        assert taker.is_alive()  # blocked by the writer
        assert (tiles / WRITER_FILE).read_text() == "job-a"
        go.touch()
        taker.join(30)
        assert not taker.is_alive()
        assert holder.wait(30) == 0
    finally:
        go.touch()
        if holder.poll() is None:
            holder.kill()
    assert (tiles / WRITER_FILE).read_text() == "job-b"
    with (
        pytest.raises(StaleWriterError, match="written by another tile job now"),
        writing(tiles, "job-a"),
    ):
        (tiles / "written").write_text("by job A")
    assert not (tiles / "written").exists()
    release(tiles, "job-a")  # not its mark: kept, and the lock file with it
    assert (tiles / WRITER_FILE).read_text() == "job-b" and (tiles / LOCK_FILE).exists()
    release(tiles, "job-b")
    assert sorted(p.name for p in tiles.iterdir()) == []


def test_a_stale_shard_never_lands_in_a_store_made_afresh(tmp_path: Path) -> None:
    """The usual takeover removes the folder and makes the store again (another lock file):
    the stale task, past its check, writes into the removed folder, not the new one."""
    tiles = tmp_path / "tiles"
    kwargs = {"shape": (16, 32, 32, 3), "dtype": "uint8", "chunks": (1, 32, 32, 3)}
    kwargs |= {"shards": (8, 32, 32, 3), "compressors": zarr.codecs.ZstdCodec(level=3)}
    zarr.create_array(tiles, **kwargs)  # type: ignore[arg-type]
    claim(tiles, "job-a")
    ready, go = tmp_path / "ready", tmp_path / "go"
    argv = [sys.executable, "-c", HOLDER, str(tiles), "job-a", str(ready), str(go), STALE_SHARD]
    holder = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        _wait_for(ready, holder)
        shutil.rmtree(tiles)  # job B: SlideStore.create at the same path
        array = zarr.create_array(tiles, **kwargs)  # type: ignore[arg-type]
        claim(tiles, "job-b")
        write_shard(array, 0, np.full((8, 32, 32, 3), 9, np.uint8))
        landed = (tiles / "c" / "0" / "0" / "0" / "0").read_bytes()
        go.touch()
        assert holder.wait(60) == 1
    finally:
        go.touch()
        if holder.poll() is None:
            holder.kill()
    assert b"StaleWriterError" in (holder.stderr.read() if holder.stderr else b"")
    assert (tiles / "c" / "0" / "0" / "0" / "0").read_bytes() == landed
    assert not list(tiles.rglob("*.partial"))
    assert (zarr.open_array(tiles, mode="r")[:8] == 9).all()
