"""Cross-process writer locks: one per slide store, per embeddings array and per search index.

A lock is an exclusive ``fcntl.flock`` on a small lock file. While held, the file holds the
holder's pid, host and start time as JSON, so a second job can say who is writing; on release
it is emptied. The kernel drops a flock when its process dies (SIGKILL included), so a dead
holder never blocks anyone: the next job takes the lock over. A lock file that is not held but
still names a holder is what a killed job left: harmless, reported by ``wsi-ssl check`` and
removed by ``--repair`` (:func:`remove_stale_lock`).

Where the lock files live (never inside a store, so they are no part of its contents)::

    <root>/.locks/slides/<slide_id>.lock                   the slide store (tiling)
    <root>/.locks/embeddings/<slide_id>/<encoder_id>.lock  one embeddings array
    <root>/index/<name>/.lock                              a search index (its writers)
    <run parent>/.<run name>.lock                          a MIL run directory

A lock is re-entrant within one thread; another thread of the same process is another writer.
A forked child (a DataLoader worker, say) drops its copy of the holder's locks at once, so a
killed holder's lock is free when the holder dies, not when its children end.
flock needs a local filesystem or NFSv4 (where Linux maps it onto byte-range locks).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from wsi_ssl.errors import LockFileError, StoreLockedError
from wsi_ssl.storage.atomic import host_name, pid_alive

__all__ = [
    "LOCKS_DIR",
    "LockHolder",
    "embeddings_lock",
    "embeddings_lock_path",
    "hold_lock",
    "is_locked",
    "lock_files",
    "read_holder",
    "remove_stale_lock",
    "run_lock_path",
    "slide_lock",
    "slide_lock_path",
    "stale_lock_files",
]

LOCKS_DIR = ".locks"
_POLL_S = 0.05


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or, in a stale file, held) a lock."""

    pid: int
    host: str
    since: str = ""

    @property
    def dead(self) -> bool:
        """True when the holder ran on this host and is gone (unknown for other hosts)."""
        return self.host == host_name() and not pid_alive(self.pid)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}" + (f" (since {self.since})" if self.since else "")


def run_lock_path(run_dir: str | Path) -> Path:
    """The lock file of a run directory (MIL), beside it like the run's staging folder: every
    job writing that directory takes it, whatever archive it trains on."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / f".{run_dir.name}.lock"


def slide_lock_path(root: str | Path, slide_id: str) -> Path:
    """The lock file of slide store ``slide_id``."""
    return Path(root) / LOCKS_DIR / "slides" / f"{slide_id}.lock"


def embeddings_lock_path(root: str | Path, slide_id: str, encoder_id: str) -> Path:
    """The lock file of the embeddings ``encoder_id`` of ``slide_id``."""
    return Path(root) / LOCKS_DIR / "embeddings" / slide_id / f"{encoder_id}.lock"


def read_holder(path: str | Path) -> LockHolder | None:
    """The holder a lock file names, or None when it is empty, missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8") or "null")
        return LockHolder(int(data["pid"]), str(data["host"]), str(data.get("since", "")))
    except (OSError, ValueError, TypeError, KeyError):
        return None


_held: dict[tuple[Path, int, bool], int] = {}
_held_guard = threading.Lock()
_held_fds: set[int] = set()  # the fds holding this process's flocks


def _drop_inherited_locks() -> None:
    """In a forked child: point each inherited lock fd at /dev/null. A flock belongs to the
    open file, which the fork shares; a child keeping it would hold the lock after its
    parent died. The fd numbers stay valid, so the parent's code the child runs on never
    touches another file."""
    global _held_guard
    _held_guard = threading.Lock()  # held across the fork (so no lock was half taken)
    _held.clear()
    if not _held_fds:
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in _held_fds:
        os.dup2(null, fd)
    os.close(null)
    _held_fds.clear()


def _take(path: Path, shared: bool) -> int | None:
    """:func:`_try_flock`, its fd recorded among the held ones before a fork can copy it (a
    fork waits for ``_held_guard``, see below)."""
    with _held_guard:
        fd = _try_flock(path, shared)
        if fd is not None:
            _held_fds.add(fd)
        return fd


os.register_at_fork(
    before=lambda: _held_guard.acquire(),
    after_in_parent=lambda: _held_guard.release(),
    after_in_child=_drop_inherited_locks,
)


def _try_flock(path: Path, shared: bool = False) -> int | None:
    """An fd holding the flock of ``path`` (the file currently at that name), or None."""
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # a read-only archive, or not ours to write
            raise LockFileError(path, err) from err
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:  # the file may have been removed (remove_stale_lock) while we waited for it
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _write_holder(fd: int) -> LockHolder:
    holder = LockHolder(
        os.getpid(), host_name(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )
    data = json.dumps({"pid": holder.pid, "host": holder.host, "since": holder.since}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    return holder


@contextlib.contextmanager
def hold_lock(
    path: str | Path,
    target: str | Path,
    *,
    wait: float = 0.0,
    shared: bool = False,
    clear_stale: bool = True,
    remove: bool = False,
) -> Iterator[None]:
    """Hold the lock file ``path`` guarding ``target`` (named in the error); ``remove`` (a
    writer's lock in a user's folder) deletes the file on release (a waiting taker checks
    it still holds the file at that name, so that is safe).

    Waits up to ``wait`` seconds (``float("inf")``: until free). ``shared`` takes a reader's
    lock: any number of readers together, but no writer (readers record no holder, and
    empty a dead writer's name unless ``clear_stale`` is False: ``check`` reports it).

    Raises:
        StoreLockedError: another live process holds it ("<target> is being written by pid N
            on HOST").
        LockFileError: the lock file cannot be created or written (read-only, full disk).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LockFileError(path, err) from err
    key = (path.resolve(), threading.get_ident(), shared)
    with _held_guard:
        depth = _held.get(key, 0)
        if depth:
            _held[key] = depth + 1
    if depth:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    deadline = time.monotonic() + wait
    while (fd := _take(path, shared)) is None:
        if time.monotonic() >= deadline:
            holder = read_holder(path)  # a dead writer's name: a reader holds it now
            raise StoreLockedError(target, None if holder is None or holder.dead else holder)
        time.sleep(_POLL_S)
    try:
        try:
            if not shared:
                _write_holder(fd)
            elif clear_stale:
                os.ftruncate(fd, 0)  # no writer holds it: any name in it is a dead writer's
        except OSError as err:  # a full disk
            raise LockFileError(path, err) from err
        with _held_guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_guard:
                _held.pop(key, None)
            if not shared:
                os.ftruncate(fd, 0)
            if remove and not shared:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
    finally:
        with _held_guard:
            _held_fds.discard(fd)
        os.close(fd)  # releases the flock


def slide_lock(
    root: str | Path,
    slide_id: str,
    *,
    wait: float = 0.0,
    shared: bool = False,
    clear_stale: bool = True,
) -> contextlib.AbstractContextManager[None]:
    """The lock of slide store ``slide_id`` under archive ``root``: exclusive for a writer
    (tiling), ``shared`` for a job that adds to the store (embedding) or reads it whole
    (``check``) and must not see it swapped meanwhile."""
    target = Path(root) / "slides" / f"{slide_id}.zarr"
    path = slide_lock_path(root, slide_id)
    return hold_lock(path, target, wait=wait, shared=shared, clear_stale=clear_stale)


def embeddings_lock(
    root: str | Path, slide_id: str, encoder_id: str, *, wait: float = 0.0
) -> contextlib.AbstractContextManager[None]:
    """The writer lock of the embeddings ``encoder_id`` of slide ``slide_id``."""
    target = Path(root) / "slides" / f"{slide_id}.zarr" / "embeddings" / encoder_id
    return hold_lock(embeddings_lock_path(root, slide_id, encoder_id), target, wait=wait)


def is_locked(path: str | Path, *, shared: bool = False) -> bool:
    """Whether the lock file ``path`` is held now (by any process, this one included) so that
    a writer (or, with ``shared``, a reader) could not take it."""
    path = Path(path)
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def lock_files(root: str | Path) -> list[Path]:
    """Every lock file under archive ``root`` (stores, embeddings, indexes), sorted."""
    root = Path(root)
    found = list((root / LOCKS_DIR).rglob("*.lock")) if (root / LOCKS_DIR).is_dir() else []
    found += (root / "index").glob("*/.lock") if (root / "index").is_dir() else []
    return sorted(found)


def stale_lock_files(root: str | Path) -> list[Path]:
    """Lock files that still name a holder although nobody holds them (left by a kill)."""
    return [p for p in lock_files(root) if read_holder(p) is not None and not is_locked(p)]


def remove_stale_lock(path: str | Path) -> bool:
    """Remove a lock file if nobody holds it (safe against a concurrent taker); True if removed."""
    path = Path(path)
    if not path.is_file() or (fd := _try_flock(path)) is None:
        return False
    try:
        path.unlink()
    finally:
        os.close(fd)
    return True
