"""The token of the tile job writing a store's tiles: tasks that outlive their job write nothing.

A tile job's tasks run in worker processes (``scheduler="processes"``) or on a Dask cluster.
When the job is killed (SIGKILL, the OOM killer) those tasks can go on, and a later job that
re-tiles the slide writes into the same ``<id>.zarr.new``: a shard the dead job's task wrote
there would be taken as the new job's. So each job leaves its token in its ``tiles`` array
folder (:func:`claim`); a task reads its tiles only while the token is its job's
(:func:`check_still_ours`), and writes its shard only inside :func:`writing`, which closes the
race between a task's last check and its shard landing:

* The task holds a shared ``flock`` on the folder's lock file (``.writer-job.lock``, only
  removed under the exclusive lock, never replaced) from its token check until its shard is
  renamed into place; :func:`claim` and :func:`release` take it exclusively. A job taking the
  folder over waits for any task in the middle of its write (one shard's encoding); after
  that, each task of the old job sees the new token and writes nothing. A shard that landed
  before the claim is overwritten by the new job, which writes every shard of its grid.
* The task writes relative to the folder it checked (an open directory fd), not by path. The
  usual takeover removes the folder and makes the store afresh (``SlideStore.create``), so
  that lock is no longer the new folder's; the stale shard then goes to the removed folder
  (or fails there), never into the new one.

So every shard in the folder, once the job's tasks are done, is the job's. flock needs a
local filesystem or NFSv4, like :mod:`wsi_ssl.storage.locks`. (Local worker processes also die
with their job: ``wsi_ssl.tiling.extract``.)

A limit on NFS: there Linux emulates flock with POSIX byte-range locks, which belong to the
process, not to the open file. In a Dask worker running several tasks at once (``nthreads`` >
1), one task closing its lock file's fd releases the shared lock of another thread's task still
writing, so a claim that keeps the folder (an in-place claim) can go ahead while that stale
shard is mid-write, and the shard can then land over the new job's. The usual takeover (the
folder removed and made afresh) stays covered by the directory-fd write, and the local
schedulers are not concerned (their threads die with the job; a worker process runs one task
at a time). On NFS, give a cluster's workers one thread each (``dask worker --nthreads 1``,
``LocalCluster(threads_per_worker=1)``), or keep the archive on a local filesystem.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from wsi_ssl.errors import StaleWriterError
from wsi_ssl.storage.atomic import atomic_write_text

__all__ = ["LOCK_FILE", "WRITER_FILE", "check_still_ours", "claim", "release", "writing"]

WRITER_FILE = ".writer-job"
"""The file in a ``tiles`` array folder that holds the token of the job writing it."""
LOCK_FILE = ".writer-job.lock"
"""The file in a ``tiles`` array folder whose flock orders shard writes and takeovers."""


@contextlib.contextmanager
def _opened(tiles_path: Path) -> Iterator[int]:
    """``tiles_path`` as an open directory fd."""
    folder = os.open(tiles_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield folder
    finally:
        os.close(folder)


@contextlib.contextmanager
def _locked(folder: int, *, shared: bool) -> Iterator[None]:
    """Hold the flock of the lock file now in ``folder``, shared (a task: the file must be
    there, FileNotFoundError otherwise) or exclusive (a job: created if missing). A lock file
    removed while this waited for it is opened again, so every holder holds the same file."""
    flags = os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT
    while True:
        fd = os.open(LOCK_FILE, flags, 0o644, dir_fd=folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                same = os.stat(LOCK_FILE, dir_fd=folder).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield
                return
        finally:
            os.close(fd)  # releases the flock


def _token(folder: int) -> str:
    """The token in ``folder`` (OSError when it cannot be read)."""
    with open(os.open(WRITER_FILE, os.O_RDONLY, dir_fd=folder), encoding="utf-8") as file:
        return file.read()


def claim(tiles_path: str | Path, job: str) -> None:
    """Mark ``tiles_path`` as written by ``job``, once no task is in the middle of writing a
    shard there; a task of another job then writes nothing."""
    path = Path(tiles_path)
    with _opened(path) as folder, _locked(folder, shared=False):
        atomic_write_text(path / WRITER_FILE, job)


def release(tiles_path: str | Path, job: str) -> None:
    """Remove ``job``'s mark and the lock file from ``tiles_path`` once no task is in the middle
    of writing a shard there (another job's mark and lock file stay)."""
    with (
        contextlib.suppress(OSError),
        _opened(Path(tiles_path)) as folder,
        _locked(folder, shared=False),
    ):
        try:
            token: str | None = _token(folder)
        except FileNotFoundError:
            token = None
        if token == job:
            os.unlink(WRITER_FILE, dir_fd=folder)
        if token in (job, None):
            os.unlink(LOCK_FILE, dir_fd=folder)


def _unreadable(tiles_path: Path, err: OSError) -> StaleWriterError:
    return StaleWriterError(
        f"{tiles_path / WRITER_FILE}: the tile job's token cannot be read "
        f"({type(err).__name__}): the job was stopped and its output removed, or this worker "
        "does not see the archive at this path (workers on other machines need it at the same "
        "absolute path)"
    )


def _taken(tiles_path: Path) -> StaleWriterError:
    return StaleWriterError(
        f"{tiles_path}: written by another tile job now; this task's job was stopped, so it "
        "writes nothing"
    )


def check_still_ours(tiles_path: str | Path, job: str) -> None:
    """Nothing when ``tiles_path`` is still marked as ``job``'s.

    Raises:
        StaleWriterError: another job writes it now (this task's job was stopped), or no
            token is there to read (the job was stopped and its output removed, or this
            worker does not see the archive at this path).
    """
    path = Path(tiles_path)
    try:
        token = (path / WRITER_FILE).read_text(encoding="utf-8")
    except OSError as err:
        raise _unreadable(path, err) from err
    if token != job:
        raise _taken(path)


@contextlib.contextmanager
def writing(tiles_path: str | Path, job: str) -> Iterator[int]:
    """Hold ``tiles_path`` for one shard write of a task of ``job``: checks the token as
    :func:`check_still_ours` does, then yields the folder as an open directory fd to write the
    shard relative to. A :func:`claim` of another job waits until the block ends.

    Raises:
        StaleWriterError: as :func:`check_still_ours` (before yielding: nothing is written),
            or the folder was removed while the block wrote into it (nothing landed at its
            path).
    """
    path = Path(tiles_path)
    with contextlib.ExitStack() as held:
        try:
            folder = held.enter_context(_opened(path))
            held.enter_context(_locked(folder, shared=True))  # no lock file: never claimed
            token = _token(folder)
        except OSError as err:
            raise _unreadable(path, err) from err
        if token != job:
            raise _taken(path)
        try:
            yield folder
        except FileNotFoundError as err:
            if os.fstat(folder).st_nlink:
                raise
            raise StaleWriterError(
                f"{path}: removed while this task wrote its shard (another tile job took the "
                "store over, or this task's job was stopped and its output removed); nothing "
                "was written there"
            ) from err
