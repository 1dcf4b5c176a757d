"""Embedding under ``torchrun``: each rank embeds its shard of the slides, rank 0 reports.

``torchrun --nproc-per-node N -m wsi_ssl.cli.main embed ROOT --encoder NAME`` starts N copies
of the command with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set. Every rank computes the same
shards as ``--devices`` does (:func:`~wsi_ssl.embedding.devices.shard_slides`, balanced by tile
count), embeds its own with the ordinary job (resume, locks, failure isolation, the atomic
commit), then the ranks exchange their summaries over a gloo process group (CPU objects, on
GPUs too) and each holds the merged one: the exit code agrees on every rank, and only rank 0
prints. A rank whose job fails as a whole (the batch-size probe out of memory, say) sends its
error instead, and its shard's slides fail with it. The device is ``EmbedConfig.device``
resolved for ``LOCAL_RANK`` ("auto"/"cuda" -> ``cuda:<local rank>``).

A stopped job (torchrun passes a Ctrl-C or a scheduler's SIGTERM on to every rank) is reported
whole too: a rank stopped sends what it finished and what it did not (all of its shard when
stopped before its job began: the shards are then computed after the stop, the same on every
rank), the ranks that were done (or waiting for the others) send theirs, and every rank raises
:class:`~wsi_ssl.outcome.JobInterrupted` with the merged report, as ``--devices`` does. A
rank's first stop signal while its job runs (or is being set up) interrupts it; later ones, and
any once its job is over, are held until the ranks have exchanged their reports, so that none
is cut short: up to :data:`HELD_STOPS` in all, a further one ends the rank at once (a peer
killed outright never joins the exchange). A stop held while every rank finished is answered
then, as one process stopped after its last slide is: JobInterrupted with the full report and
none not done (exit 143 on SIGTERM). A stop before :func:`embed_torchrun` is called (the CLI
making the encoder) ends the rank as it ends any command, without the exchange.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

from wsi_ssl.device import resolve_device
from wsi_ssl.embedding.config import EmbedConfig
from wsi_ssl.embedding.devices import (
    STOPS,
    Report,
    ShardStopped,
    merge_summaries,
    portable,
    shard_slides,
    shard_summaries,
    slide_sizes,
    unfinished_slides,
)
from wsi_ssl.embedding.job import Unlisted, embed, job_slides
from wsi_ssl.embedding.summary import EmbedSummary
from wsi_ssl.encoders import Encoder
from wsi_ssl.outcome import JobInterrupted, RemoteError
from wsi_ssl.storage import open_store

__all__ = ["GATHER_TIMEOUT", "HELD_STOPS", "Rank", "embed_torchrun", "torchrun_rank"]

GATHER_TIMEOUT = timedelta(days=7)
"""How long a rank that finished waits for the others' summaries."""

HELD_STOPS = 2
"""The stop signals a rank counts on hearing in a stopped job, the first included, and holds
while the ranks exchange their reports: a scheduler's own SIGTERM (Slurm signals every process
of the job) and torchrun's passing on of it (a stop sent to torchrun alone gives each rank
that one: torchrun starts each in a session of its own). A further stop ends the rank at once,
without the exchange: its way out of waiting for a peer killed outright (the OOM killer)."""


class Rank(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


class _Plan(NamedTuple):
    """What every rank computes alike before its job: the job's slide ids, what it says of the
    archive's other stores, the shards; and this rank's device."""

    ids: list[str]
    unlisted: Unlisted
    shards: list[list[str]]
    device: str


def torchrun_rank() -> Rank | None:
    """This process's place under torchrun (None when not started by it, or alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2 or "RANK" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return Rank(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def embed_torchrun(
    root: str | Path,
    encoder: Encoder | str | Path,
    rank: Rank,
    config: EmbedConfig | None = None,
    *,
    slides: Sequence[str] | None = None,
    weights: str | Path | None = None,
    progress: bool = False,
) -> EmbedSummary:
    """This rank's shard of :func:`~wsi_ssl.embedding.embed`; returns the merged summary of
    every rank (the same on each; ``compute["devices"]`` lists the ranks' devices).

    Raises:
        JobInterrupted: a rank was stopped (Ctrl-C, SIGTERM), or this one heard a stop while
            the ranks exchanged their reports; with the merged summary of what the ranks
            finished and the slides they did not.
        KeyboardInterrupt: a stop beyond :data:`HELD_STOPS` (no exchange, no report).
    """
    config = config or EmbedConfig()
    started = time.perf_counter()
    with _first_stop_only() as stops:
        mine: Report
        try:
            plan = _plan(root, slides, config, rank)
        except KeyboardInterrupt:  # stopped before its job began: it reports its whole shard
            plan = _plan(root, slides, config, rank)  # not done (the shards are every rank's)
            mine = ShardStopped(None, list(plan.shards[rank.rank]))
        else:
            shard = plan.shards[rank.rank]
            try:
                cfg = dataclasses.replace(config, device=plan.device)
                shown = progress and rank.rank == 0
                mine = portable(
                    embed(root, encoder, cfg, slides=shard, weights=weights, progress=shown)
                )
            except JobInterrupted as stopped:
                done = stopped.summary if isinstance(stopped.summary, EmbedSummary) else None
                mine = ShardStopped(None if done is None else portable(done), stopped.not_done)
            except KeyboardInterrupt:  # before the job began: none of its slides is done
                mine = ShardStopped(None, list(shard))
            except Exception as err:  # this rank's job failed: its shard fails with the error
                mine = RemoteError.of(err)
            finally:  # its job over, a stop waits for the ranks' exchange
                stops.armed = False
        if stops.escaped:  # a stop beyond those held came while the job ended: out now
            raise KeyboardInterrupt
        parts = _gather(rank, (plan.device, mine))
    devices = [d for d, _ in parts]
    reports: dict[int, Report] = dict(enumerate(r for _, r in parts))
    lost = {i: r for i, r in reports.items() if isinstance(r, RemoteError)}
    named = list(zip(devices, plan.shards, strict=True))
    seconds = time.perf_counter() - started
    merged = plan.unlisted.added_to(
        merge_summaries(
            root, plan.ids, named, shard_summaries(reports), lost, config, devices, seconds, encoder
        )
    )
    if stops.heard or any(isinstance(r, ShardStopped) for r in reports.values()):
        stops.answer_held()
        raise JobInterrupted(merged, unfinished_slides(plan.ids, named, reports, lost)) from None
    return merged


def _plan(root: str | Path, slides: Sequence[str] | None, config: EmbedConfig, rank: Rank) -> _Plan:
    """The job's slides and shards (reading every store's tile count) and this rank's device."""
    archive = open_store(root)
    ids, unlisted = job_slides(archive, slides)
    shards = shard_slides(slide_sizes(archive, ids), rank.world_size)
    return _Plan(ids, unlisted, shards, str(resolve_device(config.device, rank.local_rank)))


def _gather(rank: Rank, part: tuple[str, Report]) -> list[tuple[str, Report]]:
    """Every rank's ``(device, report)``. The exchange runs in a thread this one waits for:
    torch's wait for the ranks (in ``init_process_group``) holds off Python's signal handlers
    until it returns, which for a rank killed outright is :data:`GATHER_TIMEOUT` later; waiting
    here, the stops are heard (:class:`_Stops`)."""
    box: dict[str, Any] = {}

    def exchange() -> None:
        try:
            box["parts"] = _exchange(rank, part)
        except BaseException as err:  # raised in the waiting thread
            box["error"] = err

    thread = threading.Thread(target=exchange, name="wsi-ssl-exchange", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    parts: list[tuple[str, Report]] = box["parts"]
    return parts


def _exchange(rank: Rank, part: tuple[str, Report]) -> list[Any]:
    """``all_gather_object`` of ``part`` over a gloo group made for it (unless one exists)."""
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:  # after the work: ranks finish at different times, hours apart at cohort scale
        dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
    try:
        parts: list[Any] = [None] * rank.world_size
        dist.all_gather_object(parts, part)
    finally:
        if owned:
            dist.destroy_process_group()
    return parts


class _Stops:
    """The handler of SIGINT and SIGTERM while a rank works (:func:`_first_stop_only`): while
    ``armed`` (its job runs) the first stop interrupts it, as the handler in place would
    (main's records a SIGTERM), or with KeyboardInterrupt where that is the default; any
    other is only heard, to be answered once the ranks have exchanged their reports, up to
    :data:`HELD_STOPS` in all: a further one is answered at once (``escaped``)."""

    def __init__(self) -> None:
        self.armed = True
        self.heard: list[int] = []
        self.answered = False
        self.escaped = False
        self.previous = {stop: signal.getsignal(stop) for stop in STOPS}

    def __call__(self, signum: int, frame: Any) -> None:
        self.heard.append(signum)
        if self.armed:
            self.armed = False
            self._answer(signum, frame)
        elif len(self.heard) > HELD_STOPS:  # waiting, perhaps for a rank that died: out now
            self.escaped = True
            self._answer(signum, frame)

    def answer_held(self) -> None:
        """Run the handler in place for a stop that was only heard (its KeyboardInterrupt is
        the interrupt the caller raises), so that it knows of it (main: exit 143)."""
        if self.heard and not self.answered:
            with contextlib.suppress(KeyboardInterrupt):
                self._answer(self.heard[0], None)

    def _answer(self, signum: int, frame: Any) -> None:
        self.answered = True
        handler = self.previous[signal.Signals(signum)]
        if callable(handler):
            handler(signum, frame)
        raise KeyboardInterrupt


@contextmanager
def _first_stop_only() -> Iterator[_Stops]:
    """:class:`_Stops` handles SIGINT and SIGTERM in the block (not one the process ignores;
    none outside the main thread, where no handler can be set)."""
    stops = _Stops()
    if threading.current_thread() is not threading.main_thread():
        yield stops
        return
    mine = [s for s, handler in stops.previous.items() if handler != signal.SIG_IGN]
    for stop in mine:
        signal.signal(stop, stops)
    try:
        yield stops
    finally:
        for stop in mine:
            signal.signal(stop, stops.previous[stop])
