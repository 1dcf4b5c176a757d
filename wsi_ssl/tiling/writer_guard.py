"""Tile-writing tasks that outlive their job write nothing.

A tile job's tasks run in worker processes (``scheduler="processes"``) or on a Dask cluster.
When the job is killed (SIGKILL, the OOM killer) those tasks can go on, and a later job that
re-tiles the slide writes into the same ``<id>.zarr.new``: a shard the dead job's task wrote
there would be taken as the new job's. So each job leaves its token in its ``tiles`` array
folder (:func:`claim`), and a task writes its shard only while the token is its job's
(:func:`check_still_ours`). Local worker processes also die with the job that started them
(:func:`die_with_parent`, on Linux).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from wsi_ssl.errors import StoreLockedError
from wsi_ssl.storage.atomic import atomic_write_text

__all__ = ["WRITER_FILE", "check_still_ours", "claim", "die_with_parent", "release"]

WRITER_FILE = ".writer-job"
"""The file in a ``tiles`` array folder that holds the token of the job writing it."""

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def claim(tiles_path: str | Path, job: str) -> None:
    """Mark ``tiles_path`` as written by ``job`` (a task of another job then writes nothing)."""
    atomic_write_text(Path(tiles_path) / WRITER_FILE, job)


def release(tiles_path: str | Path, job: str) -> None:
    """Remove ``job``'s mark from ``tiles_path`` (another job's mark stays)."""
    path = Path(tiles_path) / WRITER_FILE
    with contextlib.suppress(OSError):
        if path.read_text() == job:
            path.unlink()


def check_still_ours(tiles_path: str | Path, job: str) -> None:
    """Nothing when ``tiles_path`` is still marked as ``job``'s.

    Raises:
        StoreLockedError: another job (or none) writes it now: this task's job was stopped.
    """
    try:
        ours = (Path(tiles_path) / WRITER_FILE).read_text() == job
    except OSError:
        ours = False
    if not ours:
        raise StoreLockedError(Path(tiles_path).parent)


def die_with_parent(parent: int) -> None:
    """In a worker process: be killed when process ``parent`` (the job) dies (Linux's
    parent-death signal; elsewhere nothing), and exit now if it is already gone."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(1)
