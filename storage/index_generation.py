"""Helpers of :mod:`wsi_ssl.storage.index_files` for writing one index generation: file
hashes, JSON files and telling a full disk from other write errors."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["file_sha256", "is_disk_full", "write_json"]


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    """The sha256 of the file at ``path``, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON (NaN refused) to ``path``, in place (inside a temp directory)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True, allow_nan=False)
        f.write("\n")


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a full disk: ``ENOSPC``, or FAISS's ``RuntimeError`` quoting it."""
    return getattr(err, "errno", None) == errno.ENOSPC or (
        isinstance(err, RuntimeError) and os.strerror(errno.ENOSPC) in str(err)
    )
