"""Why a ``wsi-ssl check --repair`` could not write: the archive is read-only (a read-only
mount), not this user's to write (permissions) or its disk is full. Such a repair is not the
check's to redo: its finding says what must change first, instead of advising the same
``--repair`` again, and one finding (:func:`unwritable_finding`) says why."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from wsi_ssl.errors import CatalogWriteError, DiskFullError
from wsi_ssl.storage.atomic import is_no_space
from wsi_ssl.storage.catalog import NOT_WRITABLE, permission_denied, why_not_writable
from wsi_ssl.storage.check_report import Finding

__all__ = [
    "DENIED",
    "FULL",
    "READ_ONLY",
    "Refusal",
    "archive_unwritable",
    "refusal",
    "refused_fix",
    "unreadable_fix",
    "unwritable_finding",
]

READ_ONLY, FULL, DENIED = "read-only", "full", "permission denied"


@dataclass(frozen=True)
class Refusal:
    """A write the archive refused: ``kind`` (READ_ONLY, FULL, DENIED), ``why`` (the OS's
    words; for DENIED, what was refused and its owner) and, for DENIED, what to do."""

    kind: str
    why: str
    todo: str = ""


def refusal(err: BaseException | None) -> Refusal | None:
    """The refusal ``err`` (or an error it was raised from) is, when it is a write the
    archive refused; None for any other failure."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, DiskFullError):
            return Refusal(FULL, os.strerror(errno.ENOSPC))
        if isinstance(err, CatalogWriteError):
            refused = why_not_writable(err.path)
            if refused is not None and refused[0] == errno.EACCES:
                return _denied(err.path) or Refusal(READ_ONLY, err.reason)
            return Refusal(READ_ONLY, err.reason)
        if is_no_space(err):
            return Refusal(FULL, err.strerror or os.strerror(err.errno or errno.ENOSPC))
        if isinstance(err, OSError) and err.errno in NOT_WRITABLE:
            words = err.strerror or os.strerror(err.errno)
            if err.errno == errno.EROFS:
                return Refusal(READ_ONLY, words)
            path = Path(err.filename) if isinstance(err.filename, str) else None
            where = f"{path} ({words})" if path is not None else words
            return (_denied(path) if path else None) or Refusal(
                DENIED, where, "fix its permissions"
            )
        err, seen = err.__cause__, seen + 1
    return None


def _denied(path: Path) -> Refusal | None:
    """The DENIED refusal of writing ``path`` or making files beside it; None: not denied."""
    denied = permission_denied(path, path.parent)
    return None if denied is None else Refusal(DENIED, *denied)


def archive_unwritable(root: Path) -> Refusal | None:
    """Why the archive at ``root`` cannot be written (a read-only mount, a folder not this
    user's to write); None when it can."""
    try:
        if os.statvfs(root).f_flag & os.ST_RDONLY:
            return Refusal(READ_ONLY, os.strerror(errno.EROFS))
    except OSError:
        return None
    denied = permission_denied(root)
    return None if denied is None else Refusal(DENIED, *denied)


def refused_fix(refused: Refusal, fix: str) -> str:
    """The fix of a finding whose repair was refused so: what must change, then ``fix``."""
    if refused.kind == FULL:
        return f"not repaired ({refused.why}): free space on the archive's disk, then: {fix}"
    return f"not repaired: once the archive is writable (see below): {fix}"


def unwritable_finding(refused: Refusal, root: Path, repair: str) -> Finding:
    """The one finding that says why ``--repair`` could not write the archive at ``root``
    (read-only or not this user's), with what to do, then ``repair``."""
    if refused.kind == DENIED:
        return Finding(
            str(root),
            f"permission denied: {refused.why}: --repair cannot change it",
            f"{refused.todo}, then: {repair}",
        )
    return Finding(
        str(root),
        f"the archive is read-only ({refused.why}): --repair cannot change it",
        "make it writable (remount it read-write, or repair the writable archive it was copied "
        f"from), then: {repair}",
    )


def unreadable_fix(catalog: Path) -> str:
    """The fix (``{root}`` to fill) of a catalog this process can read only by writing it:
    sqlite rolls a hot journal (the unfinished transaction of a killed writer) back before
    reading, and the archive refused that write."""
    check = "wsi-ssl check {root}"
    journal = f"{catalog.name}-journal"
    refused = why_not_writable(catalog)
    denied = permission_denied(catalog, catalog.parent)
    if refused and refused[0] == errno.EACCES and denied:  # journal or not: the owner's to fix
        return f"{denied[1]}, then: {check}"
    if not Path(f"{catalog}-journal").exists():
        return f"once this user may read and write it: {check}"
    return (
        f"where the archive is writable, run: {check} (reading the catalog there rolls the "
        "transaction back: this archive remounted read-write, the one it was copied from, or a "
        f"copy that keeps {journal} beside it); never delete {journal}: the catalog would "
        "stay half-written"
    )
