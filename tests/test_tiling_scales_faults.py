"""Faults of multi-scale tiling (``wsi-ssl tile --mpp 0.5,1.0``): a real job SIGKILLed at
chosen and at random points, two real jobs on one slide and one out, and broken slides in a
multi-scale batch. Each scale's archive root (``<out>/mpp-0.5``, ``<out>/mpp-1``) is complete
or holds no store under the slide's name; a plain re-run resumes what was complete and ends
with the pixels of a clean run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import run_cli, twin_of
from wsi_ssl.storage import open_store
from wsi_ssl.storage.atomic import FAULT_ENV, host_name
from wsi_ssl.storage.slide_store import is_complete_store, staging_path
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.scales import scale_root

pytestmark = [pytest.mark.faults, pytest.mark.slow]

MPPS = (0.5, 1.0)
# one worker and small shards: the job takes long enough to be killed in the middle
FLAGS = [
    "--mpp", "0.5,1.0", "--tile-size", "128", "--codec", "zstd", "--tiles-per-chunk", "4",
    "--workers", "1", "--quiet",
]  # fmt: skip


def _argv(slide: Path, out: Path, *extra: str) -> list[str]:
    return ["tile", str(slide), "--out", str(out), *FLAGS, *extra]


def _job(argv: list[str], fault: str | None = None) -> subprocess.Popen[str]:
    """``wsi-ssl`` in a real process (with the storage fault hook armed if ``fault``)."""
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.Popen(
        [sys.executable, "-m", "wsi_ssl.cli.main", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _wait_for(what: Any, proc: subprocess.Popen[str], timeout: float = 180) -> None:
    """Until ``what()`` is true; fails if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not what():
        assert proc.poll() is None, f"the job ended first: {proc.communicate()}"
        assert time.monotonic() < deadline, "the job never got there"
        time.sleep(0.005)


def _store_path(out: Path, mpp: float, slide_id: str) -> Path:
    return scale_root(out, mpp) / "slides" / f"{slide_id}.zarr"


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, cmu_small: Path) -> tuple[Path, str]:
    """CMU-1-Small-Region tiled at both scales by an uninterrupted run: (out, slide id)."""
    out = tmp_path_factory.mktemp("clean") / "out"
    code, stdout, err = run_cli([*_argv(cmu_small, out), "--json"])
    assert code == 0, err
    [slide_id] = {s["slide_id"] for s in json.loads(stdout)["slides"]}
    return out, slide_id


def _assert_like_clean(out: Path, clean: tuple[Path, str]) -> None:
    """Every scale of ``out`` holds the clean run's store, complete, pixel for pixel, and
    ``wsi-ssl check`` finds nothing to repair."""
    base, slide_id = clean
    for mpp in MPPS:
        archive = open_store(scale_root(out, mpp))
        want = open_store(scale_root(base, mpp)).slide(slide_id)
        got = archive.slide(slide_id)
        assert archive.slide_ids == [slide_id] and got.status == "complete"
        assert archive.catalog.get(slide_id).status == "complete"  # type: ignore[union-attr]
        assert got.tiling["mpp"] == mpp and got.n_tiles == want.n_tiles > 0
        np.testing.assert_array_equal(got.tiles[:], want.tiles[:])
        np.testing.assert_array_equal(got.coords, want.coords)
        np.testing.assert_array_equal(got.tissue_mask, want.tissue_mask)
        code, report, _ = run_cli(["check", str(scale_root(out, mpp))])
        assert code == 0, report
    code, report, _ = run_cli(["check", str(out)])  # the --out folder: each scale's root
    assert code == 0 and all(f"{scale_root(out, m)}: checked 1 store(s)" in report for m in MPPS)


def _complete_after_kill(out: Path, clean: tuple[Path, str]) -> dict[float, bool]:
    """Per scale, whether a killed job left its store complete; a store under the slide's
    name is never anything but complete and equal to the clean run's."""
    base, slide_id = clean
    done = {}
    for mpp in MPPS:
        path = _store_path(out, mpp, slide_id)
        staged = staging_path(path)
        done[mpp] = path.exists() or is_complete_store(staged)
        if staged.exists():  # a kill's debris, reported as such, never as a store
            code, report, _ = run_cli(["check", str(scale_root(out, mpp))])
            assert code == 1 and f"{staged}: left by a tiling job that was killed" in report
        if path.exists():
            assert is_complete_store(path), f"{path} is in place but not complete"
            archive = open_store(scale_root(out, mpp))
            assert archive.slide(slide_id).status == "complete"
            want = open_store(scale_root(base, mpp)).slide(slide_id).tiles[:]
            np.testing.assert_array_equal(archive.slide(slide_id).tiles[:], want)
        elif (scale_root(out, mpp) / "slides").exists():
            assert open_store(scale_root(out, mpp)).slide_ids == []
    return done


def _rerun_and_compare(
    out: Path, slide: Path, clean: tuple[Path, str], complete: dict[float, bool]
) -> None:
    """A plain re-run skips the scales the killed job completed, tiles the others, and the
    result equals the clean run."""
    code, stdout, err = run_cli([*_argv(slide, out), "--json"])
    assert code == 0, err
    statuses = {s["mpp"]: s["status"] for s in json.loads(stdout)["slides"]}
    assert statuses == {m: "skipped" if complete[m] else "complete" for m in MPPS}
    _assert_like_clean(out, clean)
    assert not any(staging_path(_store_path(out, m, clean[1])).exists() for m in MPPS)


@pytest.mark.parametrize(
    "point",
    [
        "mpp-0.5/slides/{id}.zarr.new/tiles/c/5/",  # the first scale half-written
        "mpp-0.5/slides/{id}.zarr#swap-in",  # the first scale complete beside, not in place
        "mpp-1/slides/{id}.zarr.new/tiles/c/3/",  # the first scale done, the second half-way
    ],
)
def test_killed_at_a_chosen_point_resumes_to_the_clean_stores(
    clean: tuple[Path, str], cmu_small: Path, tmp_path: Path, point: str
) -> None:
    out = tmp_path / "out"
    job = _job(_argv(cmu_small, out), fault=f"kill_before_rename:{point.format(id=clean[1])}")
    job.communicate(timeout=300)
    assert job.returncode == -signal.SIGKILL
    complete = _complete_after_kill(out, clean)
    first_done = point.startswith("mpp-1") or point.endswith("#swap-in")
    assert complete == {0.5: first_done, 1.0: False}
    second = scale_root(out, 1.0) / "slides"
    assert not second.exists() or open_store(scale_root(out, 1.0)).slide_ids == []
    _rerun_and_compare(out, cmu_small, clean, complete)


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_moment_resumes_to_the_clean_stores(
    clean: tuple[Path, str], cmu_small: Path, tmp_path: Path, seed: int
) -> None:
    """Killed from outside (``os.kill``) a random time after the first scale's store was
    begun, wherever the job is then: what it left is complete or not taken as complete."""
    out = tmp_path / "out"
    delay = random.Random(seed).uniform(0.0, 1.0)
    job = _job(_argv(cmu_small, out))
    begun = staging_path(_store_path(out, 0.5, clean[1]))
    _wait_for(begun.exists, job)
    time.sleep(delay)
    os.kill(job.pid, signal.SIGKILL)
    job.communicate(timeout=60)
    assert job.returncode in (-signal.SIGKILL, 0), f"delay {delay:.2f} s"
    _rerun_and_compare(out, cmu_small, clean, _complete_after_kill(out, clean))


def test_sigkill_once_the_first_scale_is_in_place(
    clean: tuple[Path, str], cmu_small: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    job = _job(_argv(cmu_small, out))
    _wait_for(_store_path(out, 0.5, clean[1]).exists, job)
    os.kill(job.pid, signal.SIGKILL)
    job.communicate(timeout=60)
    complete = _complete_after_kill(out, clean)
    assert complete[0.5]
    _rerun_and_compare(out, cmu_small, clean, complete)


def _pause_at_first_scale(out: Path, slide: Path, slide_id: str) -> subprocess.Popen[str]:
    """Job A, stopped (SIGSTOP) with its first scale's new store complete beside, holding
    that scale's lock; the second scale not begun."""
    fault = f"pause_before_rename:mpp-0.5/slides/{slide_id}.zarr#aside"
    a = _job(_argv(slide, out, "--json"), fault=fault)
    _wait_for(lambda: _state(a.pid) == "T", a)
    return a


def test_two_jobs_at_once_one_scale_busy_the_other_done_by_the_second(
    clean: tuple[Path, str], cmu_small: Path, tmp_path: Path
) -> None:
    """B finds the first scale busy (A's pid and host, exit 1 as that scale is not done,
    nothing blamed on the slide) and tiles the second; A, continued, completes the first and finds the second done."""
    out, slide_id = tmp_path / "out", clean[1]
    a = _pause_at_first_scale(out, cmu_small, slide_id)
    try:
        b = _job(_argv(cmu_small, out))
        stdout, err = b.communicate(timeout=300)
        assert b.returncode == 1
        [line] = err.splitlines()
        assert line.startswith("wsi-ssl: error: ") and line.endswith("(at mpp 0.5)")
        assert (
            "1 tiled, 0 already complete, 1 busy (another job is writing or re-tiled them; run again), 0 failed"
            in (stdout)
        )
        [busy] = [line for line in stdout.splitlines() if line.lstrip().startswith("busy")]
        assert busy.endswith(f"{cmu_small} (mpp 0.5)")
        assert f"is being written by pid {a.pid} on {host_name()}" in stdout
        assert "malformed" not in stdout and "QuPath" not in stdout
        assert open_store(scale_root(out, 0.5)).slide_ids == []  # A's store is not in place
        assert open_store(scale_root(out, 1.0)).slide(slide_id).status == "complete"
    finally:
        a.send_signal(signal.SIGCONT)
    stdout, err = a.communicate(timeout=300)
    assert a.returncode == 0, err
    statuses = {s["mpp"]: s["status"] for s in json.loads(stdout)["slides"]}
    assert statuses == {0.5: "complete", 1.0: "skipped"}
    _assert_like_clean(out, clean)


def test_two_jobs_at_once_the_waiting_one_never_tiles_a_scale_twice(
    clean: tuple[Path, str], cmu_small: Path, tmp_path: Path
) -> None:
    """B waits for the locks (``--lock-wait``): between A and B every scale is tiled once,
    the other job finding it complete (or, for A, which does not wait, busy)."""
    out, slide_id = tmp_path / "out", clean[1]
    a = _pause_at_first_scale(out, cmu_small, slide_id)
    try:
        b = _job(_argv(cmu_small, out, "--json", "--lock-wait", "300"))
        # B's main thread sleeps only between its tries at the first scale's lock
        _wait_for(lambda: "nanosleep" in Path(f"/proc/{b.pid}/wchan").read_text(), b)
        assert open_store(scale_root(out, 0.5)).slide_ids == []
    finally:
        a.send_signal(signal.SIGCONT)
    outputs = {}
    for name, job in (("a", a), ("b", b)):
        stdout, err = job.communicate(timeout=300)
        outputs[name] = {s["mpp"]: s["status"] for s in json.loads(stdout)["slides"]}
        assert job.returncode == (1 if "busy" in outputs[name].values() else 0), err
    assert outputs["a"][0.5] == "complete" and outputs["b"][0.5] == "skipped"
    pair = sorted([outputs["a"][1.0], outputs["b"][1.0]])
    assert pair in (["complete", "skipped"], ["busy", "complete"]), outputs
    _assert_like_clean(out, clean)


def test_broken_slides_in_a_multi_scale_batch_fail_alone(
    clean: tuple[Path, str], cmu_small: Path, broken_dir: Path, tmp_path: Path
) -> None:
    """Unreadable files and a slide without a scale fail at every scale, one typed line each
    naming the file; the slides before and after them are tiled at both scales."""
    twin = twin_of(cmu_small, tmp_path)
    nompp = write_synthetic_slide(tmp_path / "nompp.tiff", (1024, 768), mpp=None)
    out = tmp_path / "out"
    broken = sorted(broken_dir.iterdir())
    inputs = [str(cmu_small), *map(str, broken), str(nompp), str(twin)]
    argv = ["tile", *inputs, "--out", str(out), *FLAGS]
    code, stdout, err = run_cli([*argv, "--json"])
    assert code == 1
    summary = json.loads(stdout)
    assert (summary["complete"], summary["failed"], summary["busy"]) == (4, 2 * 4, 0)
    by_path: dict[str, dict[float, dict[str, Any]]] = {}
    for s in summary["slides"]:
        by_path.setdefault(Path(s["path"]).name, {})[s["mpp"]] = s
    for path in [*broken, nompp]:
        for mpp in MPPS:
            failed = by_path[path.name][mpp]
            assert failed["status"] == "failed" and str(path) in failed["error"]
            assert failed["slide"] == f"{path} (mpp {mpp:g})"
    assert by_path["nompp.tiff"][0.5]["error_type"] == "MissingMppError"
    assert by_path["not-a-tiff.svs"][1.0]["error_type"] == "UnsupportedSlideError"
    assert by_path["unreadable.svs"][0.5]["error_type"] == "CorruptSlideError"
    errors = err.splitlines()
    assert len(errors) == 2 * 4 and all(line.startswith("wsi-ssl: error: ") for line in errors)
    assert sum(
        str(nompp) in line
        and "--mpp-override MPP, or give each slide's scale" in line
        and "--mpp-csv FILE" in line
        and "command line" not in line
        for line in errors
    )
    assert {line.split(": ")[2] for line in errors} == {str(p) for p in [*broken, nompp]}
    for mpp in MPPS:  # each scale's failure says which scale it is
        assert sum(f"(at mpp {mpp:g})" in line for line in errors) == 4
    assert all(line.count("CorruptSlideError") <= 1 for line in errors)  # said once, not nested
    for mpp in MPPS:
        archive = open_store(scale_root(out, mpp))
        good = {s["slide_id"] for name, s in _by_name(by_path, mpp) if s["status"] == "complete"}
        assert len(good) == 2 and set(archive.slide_ids) == good
        statuses = {e.name: e.status for e in archive.catalog.entries()}
        assert statuses[cmu_small.name] == statuses[twin.name] == "complete"
        assert all(statuses.get(p.name, "failed") == "failed" for p in [*broken, nompp])
        want = open_store(scale_root(clean[0], mpp)).slide(clean[1]).tiles[:]
        np.testing.assert_array_equal(archive.slide(clean[1]).tiles[:], want)
        assert run_cli(["check", str(scale_root(out, mpp))])[0] == 0
    code, stdout, _ = run_cli(argv)  # the re-run redoes only the failures, which fail again
    assert code == 1 and "0 tiled, 4 already complete, 0 busy" in stdout


def _by_name(
    by_path: dict[str, dict[float, dict[str, Any]]], mpp: float
) -> list[tuple[str, dict[str, Any]]]:
    return [(name, scales[mpp]) for name, scales in by_path.items()]


def test_an_interrupt_between_scales_reports_the_scale_it_finished(
    clean: tuple[Path, str], cmu_small: Path, tmp_path: Path
) -> None:
    """Ctrl-C while the second scale is written: the first is reported complete, the second
    named as not done (``--json`` too); the re-run skips the first and tiles the second."""
    out, slide_id = tmp_path / "out", clean[1]
    argv = _argv(cmu_small, out, "--json")
    job = _job(argv, fault=f"pause_before_rename:mpp-1/slides/{slide_id}.zarr")
    _wait_for(lambda: _state(job.pid) == "T", job)
    job.send_signal(signal.SIGINT)
    job.send_signal(signal.SIGCONT)
    stdout, _ = job.communicate(timeout=120)
    assert job.returncode == 130
    report = json.loads(stdout)
    assert report["interrupted"] is True and report["complete"] == 1
    assert [s["slide"] for s in report["slides"]] == [f"{cmu_small} (mpp 0.5)"]
    assert report["not_done"] == [f"{cmu_small} (mpp 1)"]
    code, again, err = run_cli(_argv(cmu_small, out, "--json"))
    counts = json.loads(again)
    assert code == 0 and (counts["skipped"], counts["complete"]) == (1, 1), err
