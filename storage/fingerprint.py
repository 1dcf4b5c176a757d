"""Content fingerprints of slide files, and the slide ids derived from them."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

SLIDE_ID = re.compile(r"[0-9a-f]{16}")
"""What a slide id looks like: the first 16 hex digits of its content fingerprint."""

_SAMPLE = 1 << 20  # bytes read at each sampled offset
_N_SAMPLES = 16


def fingerprint_file(path: str | Path) -> str:
    """SHA-256 over the file size and sampled content (whole file when small).

    Files up to 32 MiB are hashed whole. Larger ones hash their size plus 1 MiB at 16 evenly
    spaced offsets including the first and last MiB: a few MiB of I/O per gigapixel slide, and a
    re-scan, re-export or truncation changes the header, the tile offsets or the size.
    """
    size = os.path.getsize(path)
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= _SAMPLE * _N_SAMPLES * 2:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        else:
            step = (size - _SAMPLE) // (_N_SAMPLES - 1)
            for i in range(_N_SAMPLES):
                f.seek(i * step)
                digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


def slide_id_from_fingerprint(fingerprint: str) -> str:
    """A stable, file-name independent slide id: the first 16 hex digits of the fingerprint."""
    return fingerprint[:16]
