"""The token of the tile job writing a store's tiles: tasks that outlive their job write nothing.

A tile job's tasks run in worker processes (``scheduler="processes"``) or on a Dask cluster.
When the job is killed (SIGKILL, the OOM killer) those tasks can go on, and a later job that
re-tiles the slide writes into the same ``<id>.zarr.new``: a shard the dead job's task wrote
there would be taken as the new job's. So each job leaves its token in its ``tiles`` array
folder (:func:`claim`), and a task reads and writes its shard only while the token is its
job's (:func:`check_still_ours`). (Local worker processes also die with their job:
``wsi_ssl.tiling.extract``.) A task that passed the check a moment before a new job took the
folder over can still land one shard there; on one machine the parent-death signal closes that.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from wsi_ssl.errors import StaleWriterError
from wsi_ssl.storage.atomic import atomic_write_text

__all__ = ["WRITER_FILE", "check_still_ours", "claim", "release"]

WRITER_FILE = ".writer-job"
"""The file in a ``tiles`` array folder that holds the token of the job writing it."""


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
        StaleWriterError: another job writes it now (this task's job was stopped), or no
            token is there to read (the job was stopped and its output removed, or this
            worker does not see the archive at this path).
    """
    path = Path(tiles_path) / WRITER_FILE
    try:
        token = path.read_text()
    except OSError as err:
        raise StaleWriterError(
            f"{path}: the tile job's token cannot be read ({type(err).__name__}): the job was "
            "stopped and its output removed, or this worker does not see the archive at this "
            "path (workers on other machines need it at the same absolute path)"
        ) from err
    if token != job:
        raise StaleWriterError(
            f"{tiles_path}: written by another tile job now; this task's job was stopped, so "
            "it writes nothing"
        )
