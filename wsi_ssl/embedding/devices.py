"""Embedding on several devices: the slides sharded across one process per device.

Each process runs the ordinary job (:func:`wsi_ssl.embedding.embed`) on its shard, so resume,
per-slide failure isolation, locking and the atomic commit are the one-device ones; the
shards are balanced by tile count (largest slide first, to the least-loaded device). A device
process whose job fails as a whole (the batch-size probe out of memory, say) fails its shard's
slides with that error, type and flag hint kept (:class:`~wsi_ssl.outcome.RemoteError`); one
that dies leaves its unfinished slides failed in the merged summary (their partial arrays are
never committed; re-running resumes them). Ctrl-C stops every device process (each is
asked with SIGINT until it answers) and reports what the shards finished and which slides
are not done, as the one-device job does (:class:`~wsi_ssl.outcome.JobInterrupted`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue as queue_module
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from wsi_ssl.device import resolve_device
from wsi_ssl.embedding.config import EmbedConfig
from wsi_ssl.embedding.job import embed, job_slides
from wsi_ssl.embedding.summary import EmbedSummary
from wsi_ssl.encoders import Encoder
from wsi_ssl.errors import ConfigError, WsiSslError
from wsi_ssl.outcome import JobInterrupted, RemoteError, SlideOutcome
from wsi_ssl.parent_watch import die_with_parent
from wsi_ssl.storage import open_store

__all__ = [
    "ShardStopped",
    "cpu_share_note",
    "embed_on_devices",
    "merge_summaries",
    "parse_devices",
    "portable",
    "shard_slides",
    "shard_summaries",
    "slide_sizes",
    "unfinished_slides",
    "usable_cpus",
]


def parse_devices(devices: str | Sequence[str]) -> list[str]:
    """``"cuda:0,cuda:1"`` (or a list) -> checked device names; repeats are allowed (CPU)."""
    names = devices.split(",") if isinstance(devices, str) else list(devices)
    names = [d.strip() for d in names if d.strip()]
    if not names:
        raise ConfigError(f"devices {devices!r}: name at least one, e.g. cuda:0,cuda:1")
    return [str(resolve_device(d)) for d in names]


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (Slurm, cgroups, ``taskset``), which
    torch's default thread count follows too; all the machine's where that is not known."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_share_note(devices: Sequence[str], cpus: int, threads: int) -> str | None:
    """The line saying that the CPU device processes among ``devices`` (checked names) would
    share too few CPUs: each runs torch with ``threads`` threads (torch's default, the usable
    CPUs, or ``OMP_NUM_THREADS``; no device process is given fewer), so two or more of them on
    ``cpus`` usable CPUs (:func:`usable_cpus`) run more threads than CPUs and compete, slower
    than one process; None when they fit."""
    n = sum(1 for d in devices if d == "cpu")
    if n < 2 or n * threads <= cpus:
        return None
    return (
        f"{n} CPU device processes of {threads} torch threads each share {cpus} usable CPUs: "
        "they compete for them and can be slower than one process (--device cpu); "
        f"OMP_NUM_THREADS={max(1, cpus // n)} splits the CPUs between them"
    )


def shard_slides(sizes: dict[str, int], n: int) -> list[list[str]]:
    """Slide ids split into ``n`` shards of about equal tile counts (largest first)."""
    shards: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for slide, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        k = load.index(min(load))
        shards[k].append(slide)
        load[k] += size
    return shards


@dataclass
class ShardStopped:
    """A device process's report when Ctrl-C stopped it: its slides' outcomes so far (None:
    stopped before its job began) and the slides it did not finish."""

    summary: EmbedSummary | None
    not_done: list[str]


Report = EmbedSummary | RemoteError | ShardStopped


STOPS = (signal.SIGINT, signal.SIGTERM)
"""Ctrl-C, and a batch scheduler's stop: a device process answers either with its report."""


_answered = threading.Event()  # set once a device process has been stopped, or is done


def _stop_on_first_signal() -> None:
    """SIGINT or SIGTERM raises KeyboardInterrupt once; later ones (the parent asks until the
    process answers), and any once the job is done, do nothing, so the report is not cut
    short. (The handler stays installed: a signal caught by Python and then ignored at the
    OS would surface as "ignored due to race condition".)"""

    def interrupt(signum: int, frame: Any) -> None:
        if not _answered.is_set():
            _answered.set()
            raise KeyboardInterrupt

    for stop in STOPS:
        signal.signal(stop, interrupt)


def _run_shard(
    root: str,
    encoder: Encoder | str,
    weights: str | None,
    config: EmbedConfig,
    slides: list[str],
    progress: bool,
    results: Any,
    index: int,
    parent: int,
) -> None:
    die_with_parent(parent)  # a job killed outright leaves no device busy for nobody
    _stop_on_first_signal()
    report: Report
    try:
        try:
            summary = embed(
                root, encoder, config, slides=slides, weights=weights, progress=progress
            )
            report = portable(summary)
        finally:  # done or stopped: the report is sent, and the process ends, whatever comes
            _answered.set()
    except JobInterrupted as stopped:
        done = stopped.summary if isinstance(stopped.summary, EmbedSummary) else None
        report = ShardStopped(None if done is None else portable(done), stopped.not_done)
    except KeyboardInterrupt:  # before the job began: none of its slides is done
        report = ShardStopped(None, list(slides))
    except Exception as err:  # the job itself failed here: its shard fails with this error
        report = RemoteError.of(err)
    results.put((index, report))


def portable(summary: EmbedSummary) -> EmbedSummary:
    """``summary`` fit to cross processes: each failed outcome's exception becomes a
    :class:`~wsi_ssl.outcome.RemoteError` (message, type name, parameters), so the parent's
    report lines carry the same flag hints as a one-process run's."""
    summary.outcomes = [o.portable() for o in summary.outcomes]
    return summary


def embed_on_devices(
    root: str | Path,
    encoder: Encoder | str | Path,
    devices: str | Sequence[str],
    config: EmbedConfig | None = None,
    *,
    slides: Sequence[str] | None = None,
    weights: str | Path | None = None,
    progress: bool = False,
    **options: Any,
) -> EmbedSummary:
    """:func:`~wsi_ssl.embedding.embed` with the slides sharded across ``devices``.

    Args:
        devices: ``"cuda:0,cuda:1"`` or a list of device names (each checked first).
        config, slides, weights, progress, options: as for ``embed``; ``config.device`` is
            replaced by each process's device.

    Returns:
        One :class:`EmbedSummary` for all slides, in the order of ``slides`` (or the
        archive's), with ``compute["devices"]`` the devices used.
    """
    names = parse_devices(devices)
    config = dataclasses.replace(config or EmbedConfig(), **options)
    started = time.perf_counter()
    archive = open_store(root)
    ids, unlisted = job_slides(archive, slides)
    sizes = slide_sizes(archive, ids)
    spec: Encoder | str = encoder if isinstance(encoder, Encoder) else str(encoder)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    jobs: list[tuple[str, list[str], Any]] = []
    reports: dict[int, Report] = {}
    try:
        for device, shard in zip(names, shard_slides(sizes, len(names)), strict=True):
            if not shard:
                continue
            cfg = dataclasses.replace(config, device=device)
            args = (
                str(root),
                spec,
                None if weights is None else str(weights),
                cfg,
                shard,
                progress,
            )
            process = ctx.Process(target=_run_shard, args=(*args, results, len(jobs), os.getpid()))
            with _children_start_deaf():
                process.start()
            jobs.append((device, shard, process))
        _collect(jobs, results, reports)
        interrupted = False
    except KeyboardInterrupt:
        _collect(jobs, results, reports, stop=True)
        interrupted = True
    shards = [(device, shard) for device, shard, _ in jobs]
    lost = {i: r for i, r in reports.items() if isinstance(r, RemoteError)}
    for index, (device, _, process) in enumerate(jobs):
        if index not in reports and not interrupted:  # died (stopped: not done, see below)
            lost[index] = RemoteError(
                f"the process embedding on {device} exited with code {process.exitcode} before "
                "reporting; re-run the same command to resume these slides",
                "DeviceProcessError",
            )
    summaries = shard_summaries(reports)
    seconds = time.perf_counter() - started
    merged = unlisted.added_to(
        merge_summaries(root, ids, shards, summaries, lost, config, names, seconds, encoder)
    )
    if interrupted or any(isinstance(r, ShardStopped) for r in reports.values()):
        raise JobInterrupted(merged, unfinished_slides(ids, shards, reports, lost)) from None
    return merged


def shard_summaries(reports: dict[int, Report]) -> dict[int, EmbedSummary]:
    """Each shard's summary by index: its job's, or what a stopped one had finished."""
    summaries: dict[int, EmbedSummary] = {}
    for index, report in reports.items():
        summary = report.summary if isinstance(report, ShardStopped) else report
        if isinstance(summary, EmbedSummary):
            summaries[index] = summary
    return summaries


@contextmanager
def _children_start_deaf() -> Iterator[None]:
    """Processes started in the block ignore SIGINT and SIGTERM until their job installs its
    handler (a Ctrl-C while one imports would print its traceback, a SIGTERM kill it before
    it could report); the parent hears them again after."""
    previous = [signal.signal(stop, signal.SIG_IGN) for stop in STOPS]
    try:
        yield
    finally:
        for stop, handler in zip(STOPS, previous, strict=True):
            signal.signal(stop, handler)


def unfinished_slides(
    ids: list[str],
    shards: list[tuple[str, list[str]]],
    reports: dict[int, Report],
    lost: dict[int, RemoteError],
) -> list[str]:
    """The slides a stopped run did not finish: a stopped shard's own list, every slide of a
    shard that never reported (unless failed as ``lost``), in the order of ``ids``."""
    left: set[str] = set()
    for index, (_, shard) in enumerate(shards):
        report = reports.get(index)
        if isinstance(report, ShardStopped):
            left.update(report.not_done)
        elif report is None and index not in lost:
            left.update(shard)
    return [s for s in ids if s in left]


def slide_sizes(archive: Any, ids: Sequence[str]) -> dict[str, int]:
    """Tiles per slide (0 for a slide that cannot be opened: the job reports why)."""
    sizes = {}
    for slide_id in ids:
        try:
            sizes[slide_id] = int(archive.slide(slide_id).n_tiles)
        except Exception:
            sizes[slide_id] = 0
    return sizes


def _collect(
    jobs: list[tuple[str, list[str], Any]],
    results: Any,
    reports: dict[int, Report],
    *,
    stop: bool = False,
) -> None:
    """Reports by job index into ``reports`` until every process has reported or exited;
    with ``stop``, each running process that has not reported is sent SIGINT every second
    (one still starting does not hear the first)."""
    while len(reports) < len(jobs):
        if stop:
            for index, (_, _, process) in enumerate(jobs):
                if index not in reports and process.is_alive():
                    os.kill(process.pid, signal.SIGINT)
        try:
            index, report = results.get(timeout=1.0)
            reports[index] = report
        except queue_module.Empty:
            if all(not p.is_alive() for _, _, p in jobs) and results.empty():
                break
    for _, _, process in jobs:
        process.join()


def merge_summaries(
    root: str | Path,
    ids: list[str],
    shards: list[tuple[str, list[str]]],
    summaries: dict[int, EmbedSummary],
    lost: dict[int, RemoteError],
    config: EmbedConfig,
    devices: list[str],
    seconds: float,
    asked: Encoder | str | Path,
) -> EmbedSummary:
    """One summary of the shards' ``(device, slides)``: each shard's own outcomes, or, for a
    shard whose job failed or whose process never reported, its slides as found on disk
    (:func:`_lost_outcome`: those it committed complete, the others failed with the ``lost``
    error; a shard in neither, stopped before it reported, has none). ``asked`` (the encoder
    as asked for: an encoder, a name or a path) names the encoder when no shard reported one."""
    by_slide: dict[str, SlideOutcome] = {}
    first = next(iter(summaries.values()), None)
    encoder_id = first.encoder_id if first else getattr(asked, "encoder_id", None)
    began = datetime.now(UTC) - timedelta(seconds=seconds)
    for index, (_, shard) in enumerate(shards):
        if index in summaries:
            by_slide.update({o.slide: o for o in summaries[index].outcomes})
        elif index in lost:
            by_slide.update(
                {s: _lost_outcome(root, s, lost[index], encoder_id, began) for s in shard}
            )
    return EmbedSummary(
        outcomes=[by_slide[s] for s in ids if s in by_slide],
        root=str(root),
        encoder_id=first.encoder_id if first else _encoder_name(asked),
        encoder=first.encoder if first else {},
        config={**config.to_dict(), "devices": devices},
        compute={**(first.compute if first else {}), "devices": devices},
        incomplete=first.incomplete if first else [],
        seconds=seconds,
        loader_wait_s=sum(s.loader_wait_s for s in summaries.values()),
    )


def _encoder_name(encoder: Encoder | str | Path) -> str:
    return encoder.encoder_id if isinstance(encoder, Encoder) else str(encoder)


def _lost_outcome(
    root: str | Path, slide: str, error: RemoteError, encoder_id: str | None, began: datetime
) -> SlideOutcome:
    """A slide of a shard that never reported: "complete" when its embeddings were committed
    during this job, else failed with ``error`` (embeddings from before the job may not be
    what it asked for: another stain normalisation, a redo with ``resume=False``)."""
    from wsi_ssl.storage.embeddings import embedding_status, read_embeddings

    if encoder_id is not None:
        with contextlib.suppress(WsiSslError, OSError, ValueError):
            store = open_store(root).slide(slide)
            if embedding_status(store, encoder_id) == "complete":
                emb = read_embeddings(store, encoder_id, lazy=True)
                made = datetime.fromisoformat(str(emb.attrs["created"]))
                if (made if made.tzinfo else made.replace(tzinfo=UTC)) >= began:
                    return SlideOutcome(slide, "complete", len(emb))
    return SlideOutcome.failure(slide, error)
