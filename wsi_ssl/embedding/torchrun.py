"""Embedding under ``torchrun``: each rank embeds its shard of the slides, rank 0 reports.

``torchrun --nproc-per-node N -m wsi_ssl.cli.main embed ROOT --encoder NAME`` starts N copies
of the command with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set. Every rank computes the same
shards as ``--devices`` does (:func:`~wsi_ssl.embedding.devices.shard_slides`, balanced by tile
count), embeds its own with the ordinary job (resume, locks, failure isolation, the atomic
commit), then the ranks exchange their summaries over a gloo process group (CPU objects, on
GPUs too) and each holds the merged one: the exit code agrees on every rank, and only rank 0
prints. A rank whose job fails as a whole (the batch-size probe out of memory, say) sends its
error instead, and its shard's slides fail with it. The device is ``EmbedConfig.device`` resolved for ``LOCAL_RANK`` ("auto"/"cuda" ->
``cuda:<local rank>``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

from wsi_ssl.device import resolve_device
from wsi_ssl.embedding.config import EmbedConfig
from wsi_ssl.embedding.devices import merge_summaries, portable, shard_slides, slide_sizes
from wsi_ssl.embedding.job import embed, job_slides
from wsi_ssl.embedding.summary import EmbedSummary
from wsi_ssl.encoders import Encoder
from wsi_ssl.outcome import RemoteError
from wsi_ssl.storage import open_store

__all__ = ["GATHER_TIMEOUT", "Rank", "embed_torchrun", "torchrun_rank"]

GATHER_TIMEOUT = timedelta(days=7)
"""How long a rank that finished waits for the others' summaries."""


class Rank(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


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
    every rank (the same on each; ``compute["devices"]`` lists the ranks' devices)."""
    import torch.distributed as dist

    config = config or EmbedConfig()
    started = time.perf_counter()
    archive = open_store(root)
    ids, unlisted = job_slides(archive, slides)
    shards = shard_slides(slide_sizes(archive, ids), rank.world_size)
    device = str(resolve_device(config.device, rank.local_rank))
    mine: EmbedSummary | RemoteError
    try:
        mine = portable(
            embed(
                root,
                encoder,
                dataclasses.replace(config, device=device),
                slides=shards[rank.rank],
                weights=weights,
                progress=progress and rank.rank == 0,
            )
        )
    except Exception as err:  # this rank's job failed: its shard fails with the error
        mine = RemoteError.of(err)
    owned = not dist.is_initialized()
    if owned:  # after the work: ranks finish at different times, hours apart at cohort scale
        dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
    try:
        parts: list[Any] = [None] * rank.world_size
        dist.all_gather_object(parts, (device, mine))
    finally:
        if owned:
            dist.destroy_process_group()
    devices = [d for d, _ in parts]
    summaries = {i: s for i, (_, s) in enumerate(parts) if isinstance(s, EmbedSummary)}
    lost = {i: s for i, (_, s) in enumerate(parts) if isinstance(s, RemoteError)}
    named = list(zip(devices, shards, strict=True))
    seconds = time.perf_counter() - started
    merged = merge_summaries(root, ids, named, summaries, lost, config, devices, seconds, encoder)
    return unlisted.added_to(merged)
