"""Why a ``wsi-ssl check --repair`` could not write: the archive is read-only (a read-only
mount, not ours to write) or its disk is full. Such a repair is not the check's to redo: its
finding says what must change first, instead of advising the same ``--repair`` again."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from wsi_ssl.errors import CatalogWriteError, DiskFullError
from wsi_ssl.storage.catalog import NOT_WRITABLE

__all__ = ["FULL", "READ_ONLY", "archive_read_only", "refusal", "refused_fix"]

READ_ONLY, FULL = "read-only", "full"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def refusal(err: BaseException | None) -> tuple[str, str] | None:
    """``(READ_ONLY or FULL, the OS's words)`` when ``err`` (or an error it was raised from)
    is a write the archive refused; None for any other failure."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, DiskFullError):
            return FULL, os.strerror(errno.ENOSPC)
        if isinstance(err, CatalogWriteError):
            return READ_ONLY, err.reason
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return FULL, err.strerror or os.strerror(err.errno)
        if isinstance(err, OSError) and err.errno in NOT_WRITABLE:
            return READ_ONLY, err.strerror or os.strerror(err.errno)
        err, seen = err.__cause__, seen + 1
    return None


def archive_read_only(root: Path) -> str | None:
    """The OS's words when the archive at ``root`` cannot be written (a read-only mount, a
    folder not ours to write); None when it can."""
    try:
        if os.statvfs(root).f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
    except OSError:
        return None
    return None if os.access(root, os.W_OK) else os.strerror(errno.EACCES)


def refused_fix(kind: str, why: str, fix: str) -> str:
    """The fix of a finding whose repair was refused so: what must change, then ``fix``."""
    if kind == FULL:
        return f"not repaired ({why}): free space on the archive's disk, then: {fix}"
    return f"not repaired: once the archive is writable (see below): {fix}"
