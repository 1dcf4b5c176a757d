"""Embedding sharded across devices: two real processes on the CPU, the same job in each (with
``--devices`` and under ``torchrun``), and one of them killed."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from wsi_ssl.config import TilingConfig
from wsi_ssl.embedding import embed
from wsi_ssl.embedding.devices import (
    cpu_share_note,
    embed_on_devices,
    parse_devices,
    shard_slides,
    slide_sizes,
)
from wsi_ssl.embedding.summary import EmbedSummary
from wsi_ssl.encoders import create_encoder
from wsi_ssl.errors import ConfigError, DeviceUnavailableError
from wsi_ssl.storage import open_store
from wsi_ssl.storage.embeddings import embedding_status
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide

TILING = TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=16, tissue_threshold=0.0)


def test_shards_balance_tiles_and_devices_are_checked() -> None:
    shards = shard_slides({"a": 100, "b": 60, "c": 50, "d": 10}, 2)
    assert shards == [["a", "d"], ["b", "c"]]  # 110 and 110 tiles
    assert shard_slides({"a": 1}, 3) == [["a"], [], []]
    assert parse_devices("cpu, cpu") == ["cpu", "cpu"]
    with pytest.raises(ConfigError, match="at least one"):
        parse_devices(" , ")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match=r"cuda:0.*not available"):
            parse_devices("cuda:0,cuda:1")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("devices")
    for seed, size in ((1, (900, 700)), (2, (700, 700)), (3, (700, 500))):
        slide = write_synthetic_slide(base / f"s{seed}.tiff", size, seed=seed)
        tile_slide(slide, base / "root", TILING)
    return base / "root"


@pytest.mark.slow
def test_two_processes_embed_what_one_does(root: Path, tmp_path: Path) -> None:
    summary = embed_on_devices(root, "random-cnn", "cpu,cpu", workers=0)
    archive = open_store(root)
    assert [r.slide for r in summary.outcomes] == archive.slide_ids
    assert not summary.failed and summary.compute["devices"] == ["cpu", "cpu"]
    assert summary.tiles_done == sum(archive.slide(s).n_tiles for s in archive.slide_ids)
    eid = summary.encoder_id
    two = {s: np.asarray(archive.embeddings(s, eid).features) for s in archive.slide_ids}
    again = embed_on_devices(root, "random-cnn", ["cpu", "cpu"], workers=0)  # resume
    assert {r.status for r in again.outcomes} == {"skipped"}
    one = embed(root, "random-cnn", resume=False, workers=0, device="cpu")  # one device
    assert one.encoder_id == eid and not one.failed
    for s in archive.slide_ids:
        one_device = np.asarray(open_store(root).embeddings(s, eid).features)
        np.testing.assert_allclose(one_device, two[s], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_slides_named_by_file_stem_are_reported_by_id(root: Path) -> None:
    """Names are resolved before sharding, so every shard's outcome is found again."""
    archive = open_store(root)
    summary = embed_on_devices(
        root, "random-cnn", "cpu,cpu", slides=["s3", "s1"], workers=0, resume=False
    )
    by_stem = {Path(archive.slide(s).source["path"]).stem: s for s in archive.slide_ids}
    assert [o.slide for o in summary.outcomes] == [by_stem["s3"], by_stem["s1"]]
    assert [o.status for o in summary.outcomes] == ["complete", "complete"]
    assert summary.tiles_done == sum(archive.slide(by_stem[s]).n_tiles for s in ("s3", "s1"))


def test_cli_devices_are_checked_before_any_work(root: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the message of a machine without CUDA")
    argv = ["embed", str(root), "--encoder", "random-cnn", "--devices", "cpu,cuda:1"]
    code, _, err = run_cli([*argv, "--quiet"])
    assert code == 2 and err.count("\n") == 1 and "cuda:1" in err and "not available" in err


def test_cli_device_beside_devices_is_refused(root: Path) -> None:
    """``--device`` beside ``--devices`` was ignored (each process got a device of the list)."""
    argv = ["embed", str(root), "--encoder", "random-cnn", "--quiet"]
    code, out, err = run_cli([*argv, "--device", "cuda:0", "--devices", "cpu,cpu"])
    assert (
        code == 2
        and out == ""
        and err
        == (
            "wsi-ssl: error: --device cuda:0 with --devices cpu,cpu: --devices names every device "
            "the job uses (one process each); leave --device out\n"
        )
    )


def test_cpu_device_processes_sharing_too_few_cpus_are_noted() -> None:
    """Each CPU device process runs torch with its default threads (the usable CPUs): two or
    more of them oversubscribe the CPUs, and the note says so."""
    note = cpu_share_note(["cpu", "cpu"], cpus=2, threads=2)
    assert note == (
        "2 CPU device processes of 2 torch threads each share 2 usable CPUs: they compete for "
        "them and can be slower than one process (--device cpu); OMP_NUM_THREADS=1 splits the "
        "CPUs between them"
    )
    assert cpu_share_note(["cpu"] * 3, cpus=16, threads=8) == (
        "3 CPU device processes of 8 torch threads each share 16 usable CPUs: they compete for "
        "them and can be slower than one process (--device cpu); OMP_NUM_THREADS=5 splits the "
        "CPUs between them"
    )
    assert cpu_share_note(["cpu", "cpu"], cpus=16, threads=8) is None  # 16 threads, 16 CPUs
    assert cpu_share_note(["cpu", "cpu"], cpus=2, threads=1) is None  # OMP_NUM_THREADS=1
    assert cpu_share_note(["cpu"], cpus=1, threads=4) is None  # one process: nothing shared
    assert cpu_share_note(["cuda:0", "cuda:1", "cpu"], cpus=2, threads=2) is None


def test_cli_counts_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    """Pinned to one CPU (as Slurm, a cgroup or taskset pins a job), `--devices cpu,cpu` is
    noted against that one CPU, not the machine's (it compared with os.cpu_count(), and on a
    machine of two CPUs and one torch thread said nothing). Before the work: here an archive
    that is not there."""
    pinned = {min(os.sched_getaffinity(0))}
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, pinned)
    try:
        cpus, threads = len(os.sched_getaffinity(0)), torch.get_num_threads()
        argv = ["embed", str(tmp_path / "none"), "--encoder", "random-cnn"]
        code, _, err = run_cli([*argv, "--devices", "cpu,cpu", "--quiet"])
    finally:
        os.sched_setaffinity(0, before)
    note, error = err.splitlines()
    assert cpus == 1 and note == (
        f"note: 2 CPU device processes of {threads} torch threads each share 1 usable CPUs: "
        "they compete for them and can be slower than one process (--device cpu); "
        "OMP_NUM_THREADS=1 splits the CPUs between them"
    )
    assert code == 2 and error.startswith("wsi-ssl: error: ")


def _fresh_copy(root: Path, dest: Path) -> Path:
    """The archive's slide stores without any embeddings."""
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("embeddings"))
    return dest


def _embed_killing_at(
    root: Path, slide: str, monkeypatch: pytest.MonkeyPatch, **options: Any
) -> EmbedSummary:
    """Embed on two CPU processes; the one holding ``slide`` is SIGKILLed as it commits it."""
    monkeypatch.setenv("WSI_SSL_FAULT", f"kill_before_rename:{slide}.zarr/embeddings/")
    return embed_on_devices(root, "random-cnn", "cpu,cpu", workers=0, **options)


@pytest.mark.slow
@pytest.mark.faults
def test_a_killed_device_process_fails_its_slides_only_and_a_rerun_completes_them(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _fresh_copy(root, tmp_path / "root")
    archive = open_store(root)
    lost, kept = shard_slides(slide_sizes(archive, archive.slide_ids), 2)
    # the first device's process is SIGKILLed as it commits its first slide
    summary = _embed_killing_at(root, lost[0], monkeypatch)
    by_slide = {o.slide: o for o in summary.outcomes}
    assert {s for s, o in by_slide.items() if o.status == "complete"} == set(kept)
    for s in lost:
        assert by_slide[s].status == "failed" and by_slide[s].error_type == "DeviceProcessError"
        assert "exited with code -9" in (by_slide[s].error or "")
        assert embedding_status(archive.slide(s), summary.encoder_id) != "complete"
    assert summary.exit_code == 1
    monkeypatch.delenv("WSI_SSL_FAULT")
    again = embed_on_devices(root, "random-cnn", "cpu,cpu", workers=0)
    status = {o.slide: o.status for o in again.outcomes}
    assert {status[s] for s in kept} == {"skipped"}
    # the victim died between marking its array complete and renaming it into place: the
    # re-run's writer finishes that rename (skipped, not redone); the shard's others are embedded
    assert status[lost[0]] == "skipped" and {status[s] for s in lost[1:]} <= {"complete"}
    for s in archive.slide_ids:
        assert embedding_status(archive.slide(s), again.encoder_id) == "complete"


@pytest.mark.slow
@pytest.mark.faults
def test_a_killed_device_process_reports_the_slides_it_committed_before_dying(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _fresh_copy(root, tmp_path / "root")
    archive = open_store(root)
    one, two = shard_slides(slide_sizes(archive, archive.slide_ids), 2)
    assert len(two) == 2
    # the second device's process commits its first slide, then is SIGKILLed at its second
    summary = _embed_killing_at(root, two[1], monkeypatch)
    status = {o.slide: o.status for o in summary.outcomes}
    assert status == {one[0]: "complete", two[0]: "complete", two[1]: "failed"}
    assert embedding_status(archive.slide(two[0]), summary.encoder_id) == "complete"
    assert summary.exit_code == 1 and summary.counts["complete"] == 2
    # every slide complete, then redone (resume off) with the same kill: the slide the dead
    # process did not redo is failed, not taken for done by the embeddings it was to replace
    monkeypatch.delenv("WSI_SSL_FAULT")
    assert embed_on_devices(root, "random-cnn", "cpu,cpu", workers=0).exit_code == 0
    summary = _embed_killing_at(root, two[1], monkeypatch, resume=False)
    status = {o.slide: o.status for o in summary.outcomes}
    assert status == {one[0]: "complete", two[0]: "complete", two[1]: "failed"}


@pytest.mark.slow
def test_torchrun_shards_the_slides_and_rank_zero_reports(root: Path, tmp_path: Path) -> None:
    root = _fresh_copy(root, tmp_path / "root")
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "wsi_ssl.cli.main", "embed", str(root), "--encoder", "random-cnn",
        "--device", "cpu", "--workers", "0", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    totals = [line for line in done.stdout.splitlines() if " embedded, " in line]
    assert len(totals) == 1 and totals[0].startswith("3 embedded, 0 already complete")
    archive = open_store(root)
    eid = create_encoder("random-cnn").encoder_id
    assert all(embedding_status(archive.slide(s), eid) == "complete" for s in archive.slide_ids)
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "0 embedded, 3 already complete" in again.stdout


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two slides: one tiled at 224 px (the random-init CNN's input size), one at 128 px."""
    base = tmp_path_factory.mktemp("mixed")
    for seed, size in ((1, 224), (2, 128)):
        slide = write_synthetic_slide(base / f"m{seed}.tiff", (700, 500), seed=seed)
        tile_slide(slide, base / "root", dataclasses.replace(TILING, tile_size=size))
    return base / "root"


def _errors(stderr: str) -> str:
    """``stderr`` without its notes (CPU device processes sharing few cores, say)."""
    return "".join(line for line in stderr.splitlines(True) if not line.startswith("note: "))


def _failure_lines(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if "Error: " in line]


@pytest.mark.slow
def test_a_failure_in_a_device_process_or_rank_keeps_its_flag_hint(mixed_root: Path) -> None:
    """A slide that fails in a ``--devices`` process or a torchrun rank (128 px tiles,
    resize='never') is reported as a one-process run reports it: its type, its message and
    the flags of its parameters."""
    argv = ["embed", str(mixed_root), "--encoder", "random-cnn"]
    argv += ["--workers", "0", "--resize", "never", "--quiet"]
    code, out, err = run_cli([*argv, "--device", "cpu"])
    assert code == 1 and err.count("\n") == 1
    assert (
        "re-tile with --tile-size 224 or choose --resize bilinear (a different encoder_id)" in err
    )
    [line] = _failure_lines(out)
    assert line.startswith("InputSizeMismatchError: ") and "choose --resize bilinear" in line
    assert "re-tile with --tile-size 224" in line  # wsi-ssl tile's flag, not tile_size=224
    code, out, err_devices = run_cli([*argv, "--devices", "cpu,cpu"])
    assert code == 1 and _errors(err_devices) == err and _failure_lines(out) == [line]
    assert "1 already complete" in out  # the other slide, embedded by the first run
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc-per-node", "2", "-m", "wsi_ssl.cli.main", *argv, "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode != 0 and _failure_lines(done.stdout) == [line]
    assert [e for e in done.stderr.splitlines() if e.startswith("wsi-ssl: ")] == [err.rstrip()]


@pytest.mark.slow
def test_a_job_failing_in_a_device_process_fails_its_slides_with_its_error(
    mixed_root: Path, tmp_path: Path
) -> None:
    """The job itself fails in each device process (a stain reference that is no image): the
    slides fail with that typed error, not as a process that died."""
    reference = tmp_path / "reference.png"
    reference.write_text("not an image")
    argv = ["embed", str(mixed_root), "--encoder", "random-cnn"]
    argv += ["--workers", "0", "--quiet", "--stain-normalize", "reinhard"]
    argv += ["--stain-reference", str(reference)]
    code, _, err = run_cli([*argv, "--device", "cpu"])  # one process: the job's one line
    assert code == 2 and err.count("\n") == 1 and "cannot read the reference image" in err
    code, out, err_devices = run_cli([*argv, "--devices", "cpu,cpu", "--json"])
    err_devices = _errors(err_devices)
    assert code == 1
    summary = json.loads(out)
    slides = summary["slides"]
    assert len(slides) == 2 and {s["status"] for s in slides} == {"failed"}
    assert {s["error_type"] for s in slides} == {"StainNormalizationError"}
    assert summary["encoder_id"].startswith("random-cnn")  # named though no process reported
    assert err_devices.splitlines() == [err.rstrip()] * 2  # the one-process line, per slide
    # the JSON words the error as the line does: with the flag that names the parameter
    assert all(err == f"wsi-ssl: error: {s['error']}\n" for s in slides)
    assert all("(command line: --stain-reference" in s["error"] for s in slides), slides


def _stopped_child(parent: int, timeout: float = 180) -> int:
    """The pid of ``parent``'s child process that has stopped itself (SIGSTOP at the fault
    point)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "T" and int(fields[1]) == parent:
                return int(stat.parent.name)
        time.sleep(0.05)
    raise AssertionError("no device process reached the fault point")


def _sigint_pending(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    masks = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return any(int(masks[k], 16) & (1 << (signal.SIGINT - 1)) for k in ("SigPnd", "ShdPnd"))


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("who", ["terminal", "parent", "scheduler", "one device"])
def test_ctrl_c_stops_every_device_process_and_reports_what_was_finished(
    root: Path, tmp_path: Path, who: str
) -> None:
    """Ctrl-C while one device process commits its first slide, after the other finished its
    shard: the report names the finished slides complete and the stopped shard's slides not
    done (no traceback from any process), whether the terminal sent SIGINT to every process,
    only the parent got it (it asks its processes), a batch scheduler sent SIGTERM to them
    all, or one device process alone got SIGTERM (its slides were left out of the report);
    the re-run embeds only those."""
    root = _fresh_copy(root, tmp_path / "root")
    archive = open_store(root)
    stopped, finished = shard_slides(slide_sizes(archive, archive.slide_ids), 2)
    eid = create_encoder("random-cnn").encoder_id
    argv = ["embed", str(root), "--encoder", "random-cnn", "--devices", "cpu,cpu", "--quiet"]
    code = "import sys; from wsi_ssl.cli.main import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "WSI_SSL_FAULT": f"pause_before_rename:{stopped[0]}.zarr/embeddings/"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv, "--workers", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        child = _stopped_child(proc.pid)
        deadline = time.monotonic() + 180
        while any(embedding_status(archive.slide(s), eid) != "complete" for s in finished):
            assert time.monotonic() < deadline, "the other device never finished its shard"
            time.sleep(0.1)
        if who in ("terminal", "scheduler"):  # Ctrl-C, or SIGTERM to the job's processes
            os.killpg(proc.pid, signal.SIGINT if who == "terminal" else signal.SIGTERM)
        elif who == "one device":
            os.kill(child, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGINT)
            while not _sigint_pending(child):
                time.sleep(0.05)
        os.kill(child, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == (143 if who == "scheduler" else 130), err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "wsi-ssl: interrupted"
    )
    lines = out.strip().splitlines()
    complete = [ln.split()[4] for ln in lines if ln.startswith("complete ")]
    assert sorted(complete) == sorted(finished)
    ordered = [s for s in archive.slide_ids if s in stopped]
    assert lines[-1] == f"not done: {len(stopped)} slide(s) when interrupted ({', '.join(ordered)})"
    assert all(embedding_status(archive.slide(s), eid) != "complete" for s in stopped)
    again = embed_on_devices(root, "random-cnn", "cpu,cpu", workers=0)
    status = {o.slide: o.status for o in again.outcomes}
    assert {status[s] for s in finished} == {"skipped"}
    assert {status[s] for s in stopped} == {"complete"}


def test_a_damaged_store_fails_on_devices_and_under_torchrun_as_in_one_process(
    root: Path, tmp_path: Path
) -> None:
    """A store whose metadata cannot be read: sharded jobs fail it with its error and exit 1,
    as one process does (they left it out, exit 0, nowhere in --json)."""
    root = _fresh_copy(root, tmp_path / "root")
    damaged = open_store(root).slide_ids[1]
    (open_store(root).store_path(damaged) / "zarr.json").write_text("{bad")
    base = ["embed", str(root), "--encoder", "random-cnn", "--workers", "0", "--quiet", "--json"]
    code, out, _ = run_cli([*base, "--devices", "cpu,cpu"])
    slides = {s["slide"]: s for s in json.loads(out)["slides"]}
    assert code == 1 and slides[damaged]["status"] == "failed", out
    assert slides[damaged]["error_type"] == "StoreCorruptError" and len(slides) == 3
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "wsi_ssl.cli.main", *base, "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    slides = {s["slide"]: s for s in json.loads(done.stdout)["slides"]}
    assert slides[damaged]["error_type"] == "StoreCorruptError" and len(slides) == 3


@pytest.mark.faults
def test_device_processes_end_with_a_job_killed_outright(root: Path, tmp_path: Path) -> None:
    """SIGKILL to the job (the OOM killer): its device processes end with it (they went on
    embedding their shards for nobody, holding the slides' locks: a re-run found them busy)."""
    root = _fresh_copy(root, tmp_path / "root")
    archive = open_store(root)
    stopped, _ = shard_slides(slide_sizes(archive, archive.slide_ids), 2)
    argv = ["embed", str(root), "--encoder", "random-cnn", "--devices", "cpu,cpu", "--quiet"]
    code = "import sys; from wsi_ssl.cli.main import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "WSI_SSL_FAULT": f"pause_before_rename:{stopped[0]}.zarr/embeddings/"}
    proc = subprocess.Popen([sys.executable, "-c", code, *argv, "--workers", "0"], env=env)
    children: list[int] = []
    try:
        child = _stopped_child(proc.pid)  # one device process paused mid-slide
        children = [child]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                break
            time.sleep(0.1)
        gone = not Path(f"/proc/{child}").exists() or state == "Z"
        assert gone, "the paused device process outlived its job"
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    again = embed_on_devices(root, "random-cnn", "cpu,cpu", workers=0)
    assert not again.failed and not again.busy
