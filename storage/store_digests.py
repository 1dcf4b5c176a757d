"""The sha256 of a slide store's arrays but the tiles and the embeddings, recorded when the
store is completed (its ``contents_sha256`` attribute) and checked on reading.

A lost chunk file of a small array (coords, tissue fraction, thumbnail, tissue mask,
``qc/<metric>``, ``labels/<name>``) reads as zarr's fill value, zeros, which no codec checksum
can tell from data: only the digest taken at completion does. ``SlideStore`` checks each array
against it on its first read (these arrays are small: the coords of 100,000 tiles are 1.6 MB).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from wsi_ssl.errors import StoreCorruptError


def array_sha256(values: np.ndarray) -> str:
    """sha256 of an array's bytes in C order (for int64 coordinates, the embeddings'
    ``coords_sha256``)."""
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def digested_arrays(store_path: Path) -> list[str]:
    """The paths of the arrays of the store at ``store_path`` whose digests completion
    records: every array but the tiles and the embeddings, found from the folders (the
    embeddings' metadata is none of the store's).

    Raises:
        ValueError: an array's metadata is not JSON.
    """
    names = []
    for folder, dirs, files in os.walk(store_path):
        rel = Path(folder).relative_to(store_path).as_posix()
        if rel == ".":
            dirs[:] = [d for d in dirs if d not in ("tiles", "embeddings")]
        elif "zarr.json" in files:
            meta = json.loads((Path(folder) / "zarr.json").read_text())
            if meta.get("node_type") == "array":
                dirs[:] = []  # its chunks
                names.append(rel)
    return names


def changed_since_tiling(names: Iterable[str]) -> str:
    """What is wrong with arrays ``names`` whose values differ from their recorded digests."""
    return f"{', '.join(names)} changed since tiling (chunk files lost or altered)"


def check_digest(
    store_path: Path, name: str, values: np.ndarray, recorded: Mapping[str, str]
) -> None:
    """Refuse the values of array ``name`` of the store at ``store_path`` when ``recorded``
    (its ``contents_sha256``) holds another digest for them; none recorded: nothing to check.

    Raises:
        StoreCorruptError: the values are not those the store was completed with (a lost
            chunk file, read as zeros); ``wsi-ssl check`` prints the tile command redoing it.
    """
    digest = recorded.get(name)
    if digest is not None and array_sha256(values) != digest:
        raise StoreCorruptError(store_path, changed_since_tiling([name]))
