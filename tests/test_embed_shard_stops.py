"""A stopped sharded embedding job: under torchrun rank 0 reports every rank's slides, a rank
stopped before its shards are known still reports, one waiting for a rank that never comes
ends on a stop beyond those it holds, and the DataLoader workers a scheduler's SIGTERM reaches
leave no traceback (real processes, real stores, real signals)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from wsi_ssl.cli.main import _sigterm_stops_like_ctrl_c
from wsi_ssl.config import TilingConfig
from wsi_ssl.embedding.config import EmbedConfig
from wsi_ssl.embedding.devices import shard_slides, slide_sizes
from wsi_ssl.embedding.loader import TileBatches, make_loader, work_units
from wsi_ssl.embedding.torchrun import HELD_STOPS, Rank, embed_torchrun
from wsi_ssl.encoders import create_encoder
from wsi_ssl.outcome import JobInterrupted
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


class _StopWhileListed(list[str]):
    """Slide ids whose first listing brings a SIGTERM: a scheduler's stop while the job lists
    its slides, before its shards are known (a later listing brings none)."""

    sent = False

    def __iter__(self) -> Iterator[str]:
        if not self.sent:
            self.sent = True
            signal.raise_signal(signal.SIGTERM)  # its handler runs here, before the listing
        return super().__iter__()


def _fresh_copy(root: Path, dest: Path) -> Path:
    """The archive's slide stores without any embeddings."""
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("embeddings"))
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_rank_stopped_before_its_shards_are_known_still_reports_its_shard(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM while the rank lists the job's slides (before it knew its shard; the stop went
    to main's handler and the rank left without joining the exchange, its peers waiting): the
    rank computes the shards after it, joins the exchange and reports its whole shard not
    done, and main hears the SIGTERM (exit 143)."""
    root = _fresh_copy(root, tmp_path / "root")
    ids = open_store(root).slide_ids
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "1"}
    for name, value in {**env, "RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    terminated: list[int] = []
    caught: KeyboardInterrupt | None = None
    with _sigterm_stops_like_ctrl_c(terminated):  # main's handler, in place under the rank's
        try:
            config = EmbedConfig(device="cpu", workers=0)
            embed_torchrun(root, "random-cnn", Rank(0, 1, 0), config, slides=_StopWhileListed(ids))
        except KeyboardInterrupt as err:
            caught = err
    assert isinstance(caught, JobInterrupted)
    assert caught.not_done == ids and caught.summary.outcomes == []
    assert caught.summary.config["devices"] == ["cpu"] and terminated == [signal.SIGTERM]
    eid = create_encoder("random-cnn").encoder_id
    assert all(embedding_status(open_store(root).slide(s), eid) == "missing" for s in ids)


def _listening(port: int) -> bool:
    """Whether a process listens on TCP ``port`` (rank 0 hosts the exchange's store)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _rank(root: Path, rank: int, port: int) -> subprocess.Popen[str]:
    """Rank ``rank`` of two of ``wsi-ssl embed`` (as torchrun starts it), on the CPU."""
    argv = [sys.executable, "-m", "wsi_ssl.cli.main", "embed", str(root)]
    argv += ["--encoder", "random-cnn", "--device", "cpu", "--workers", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank)}
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _rank_zero_waiting(root: Path) -> tuple[subprocess.Popen[str], int]:
    """Rank 0 started alone, once it has embedded its shard and waits for rank 1 at the
    exchange (it listens on the port of the exchange's store, which it hosts); and the port."""
    port = _free_port()
    proc = _rank(root, 0, port)
    deadline = time.monotonic() + 120
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"rank 0 did not reach the exchange: {proc.communicate()}")
        time.sleep(0.1)
    return proc, port


def _stop(proc: subprocess.Popen[str], times: int) -> None:
    """SIGTERM ``times`` times, each heard before the next is sent."""
    for _ in range(times):
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.3)


def test_a_rank_waiting_for_one_that_never_comes_ends_on_a_stop_beyond_those_held(
    root: Path, tmp_path: Path
) -> None:
    """Rank 1 killed outright (here never started) never joins the exchange: rank 0, its shard
    done, waits for it, holds a scheduler's and torchrun's SIGTERM, and the next ends it at
    once with exit 143 (torch's wait held off every stop: only SIGKILL ended it)."""
    root = _fresh_copy(root, tmp_path / "root")
    archive = open_store(root)
    mine = shard_slides(slide_sizes(archive, archive.slide_ids), 2)[0]
    proc, _ = _rank_zero_waiting(root)
    try:
        _stop(proc, HELD_STOPS)
        time.sleep(1.0)
        assert proc.poll() is None, "a stop it should hold ended it"
        _stop(proc, 1)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.splitlines()[-1].startswith("wsi-ssl: interrupted (SIGTERM)") and out == ""
    eid = create_encoder("random-cnn").encoder_id
    assert all(embedding_status(archive.slide(s), eid) == "complete" for s in mine)


def test_a_stop_held_while_every_rank_finished_is_answered_with_the_full_report(
    root: Path, tmp_path: Path
) -> None:
    """Rank 0 waits for rank 1 and hears the stops a rank holds; rank 1 then finishes its shard
    and joins: the report is whole, nothing not done, and rank 0 answers the stop with exit
    143, as one process stopped after its last slide does (it ended 0, the stop dropped);
    rank 1, stopped by nothing, ends 0."""
    root = _fresh_copy(root, tmp_path / "root")
    proc, port = _rank_zero_waiting(root)
    other = None
    try:
        _stop(proc, HELD_STOPS)
        other = _rank(root, 1, port)
        out, err = proc.communicate(timeout=120)
        _, other_err = other.communicate(timeout=60)
        assert other.returncode == 0, other_err
    finally:
        for p in (proc, other):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = out.strip().splitlines()
    assert lines[-1] == "not done: 0 slide(s) when interrupted"
    assert lines[-2].startswith("3 embedded, 0 already complete")
    assert err.splitlines()[-1].startswith("wsi-ssl: interrupted (SIGTERM)")
