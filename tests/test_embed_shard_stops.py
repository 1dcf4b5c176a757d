"""A stopped sharded embedding job: under torchrun rank 0 reports every rank's slides, and the
DataLoader workers a scheduler's SIGTERM reaches leave no traceback (real processes, real
stores, real signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wsi_ssl.config import TilingConfig
from wsi_ssl.embedding.devices import shard_slides, slide_sizes
from wsi_ssl.embedding.loader import TileBatches, make_loader, work_units
from wsi_ssl.encoders import create_encoder
from wsi_ssl.storage import open_store
from wsi_ssl.storage.embeddings import embedding_status
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide

TILING = TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=16, tissue_threshold=0.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three slides of 12 to 20 tiles: shards of one and two slides on two ranks."""
    base = tmp_path_factory.mktemp("stops")
    for seed, size in ((1, (900, 700)), (2, (700, 700)), (3, (700, 500))):
        slide = write_synthetic_slide(base / f"s{seed}.tiff", size, seed=seed)
        tile_slide(slide, base / "root", TILING)
    return base / "root"


def _children(parent: int, state: str | None = None) -> set[int]:
    """The pids of ``parent``'s child processes (in that ``state``: "T", stopped)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and state in (None, fields[0]):
            found.add(int(stat.parent.name))
    return found


def _pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` waits to be delivered to (stopped) process ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return any(int(masks[k], 16) & (1 << (signum - 1)) for k in ("SigPnd", "ShdPnd"))


@pytest.mark.slow
@pytest.mark.faults
def test_a_stopped_torchrun_job_reports_every_ranks_slides(root: Path) -> None:
    """SIGTERM to torchrun (as a scheduler stops it) while rank 0 commits its slide and rank
    1 has embedded its two: rank 0 reports rank 1's slides complete and its own not done (it
    listed its own shard alone), and no loader worker's death prints a traceback."""
    archive = open_store(root)
    stopped, finished = shard_slides(slide_sizes(archive, archive.slide_ids), 2)
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "wsi_ssl.cli.main", "embed", str(root), "--encoder", "random-cnn",
        "--device", "cpu", "--workers", "1", "--quiet",
    ]  # fmt: skip
    fault = f"pause_before_rename:{stopped[0]}.zarr/embeddings/"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WSI_SSL_FAULT": fault}
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    eid = create_encoder("random-cnn").encoder_id
    try:
        deadline = time.monotonic() + 300
        while not (paused := _children(proc.pid, "T")) or any(
            embedding_status(archive.slide(s), eid) != "complete" for s in finished
        ):
            assert time.monotonic() < deadline and proc.poll() is None, "no rank got there"
            time.sleep(0.1)
        rank = paused.pop()
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun passes it on to each rank's group
        while not _pending(rank, signal.SIGTERM):
            assert time.monotonic() < deadline, "torchrun did not pass the SIGTERM on"
            time.sleep(0.05)
        os.kill(rank, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    lines = out.strip().splitlines()
    complete = [line.split()[4] for line in lines if line.startswith("complete ")]
    assert sorted(complete) == sorted(finished), out + err
    assert lines[-1] == f"not done: 1 slide(s) when interrupted ({stopped[0]})"
    assert lines[-2].startswith(f"{len(finished)} embedded, 0 already complete")
    assert "Exception ignored" not in err and "DataLoader worker" not in err, err
    assert embedding_status(archive.slide(stopped[0]), eid) != "complete"


def test_a_sigterm_to_the_job_group_leaves_its_loader_workers_working(root: Path) -> None:
    """A scheduler (or torchrun) sends SIGTERM to the whole process group: a loader worker
    ignores it (its job's process ends it); killed, it made the loader raise "worker is
    killed by signal", on the job's way out an "Exception ignored" traceback."""
    archive = open_store(root)
    paths = [str(archive.store_path(s) / "tiles") for s in archive.slide_ids]
    units = work_units([archive.slide(s).n_tiles for s in archive.slide_ids], 4)
    loader = make_loader(TileBatches(paths, units), workers=1, pin_memory=False, prefetch=1)
    before = _children(os.getpid())
    batches = iter(loader)
    first = next(batches)
    [worker] = _children(os.getpid()) - before
    os.kill(worker, signal.SIGTERM)
    time.sleep(0.5)  # a worker killed by it has died by now, and the loader heard of it
    rest = list(batches)
    assert [first.unit, *(b.unit for b in rest)] == list(range(len(units)))
    assert all(b.error == "" and b.tiles.dtype == torch.uint8 for b in [first, *rest])
