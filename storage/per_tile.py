"""Per-tile tables of a slide store: ``qc/<metric>`` scores and ``labels/<name>`` fractions.

``qc/<metric>``: float32 (N,), one quality score per tile; the tiling tasks return their
scores and the job writes each array once (a chunk file per metric rather than per task). ``labels/<name>``: float32 (N, C), each
tile's area fraction of C annotation classes, the class names in the ``classes`` attribute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from wsi_ssl.errors import NoLabelsError
from wsi_ssl.storage.codecs import CHECKED_ZSTD, read_values

QC_GROUP = "qc"
LABELS_GROUP = "labels"


QC_CHUNK = 1 << 16
"""Scores per chunk of a ``qc/<metric>`` array (one chunk for a slide of up to 65,536 tiles)."""


def write_qc(group: zarr.Group, scores: Mapping[str, np.ndarray]) -> None:
    """Store ``qc/<metric>``: float32 (N,) per metric, written once after extraction."""
    qc = group.require_group(QC_GROUP)
    for metric, values in scores.items():
        data = np.asarray(values, dtype=np.float32)
        chunks = (max(1, min(len(data), QC_CHUNK)),)
        qc.create_array(metric, data=data, chunks=chunks, compressors=CHECKED_ZSTD)


def read_qc(group: zarr.Group, path: Path) -> dict[str, np.ndarray]:
    """Every ``qc/<metric>`` as float32 (N,); empty when the store (at ``path``) has none.

    Raises:
        StoreCorruptError: a chunk file of a metric does not decode.
    """
    if QC_GROUP not in group:
        return {}
    qc = cast(zarr.Group, group[QC_GROUP])
    return {
        name: read_values(cast("zarr.Array[Any]", qc[name]), path, f"{QC_GROUP}/{name}")
        for name in sorted(qc.array_keys())
    }


def write_labels(
    group: zarr.Group, name: str, fractions: np.ndarray, classes: Sequence[str]
) -> None:
    """Store ``labels/<name>``: float32 (N, C) class fractions, class names in attrs."""
    fractions = np.asarray(fractions, dtype=np.float32)
    if fractions.ndim != 2 or fractions.shape[1] != len(classes):
        raise ValueError(f"fractions must be (N, {len(classes)}), got {fractions.shape}")
    labels = group.require_group(LABELS_GROUP)
    array = labels.create_array(name, data=fractions, overwrite=True, compressors=CHECKED_ZSTD)
    array.attrs["classes"] = list(classes)


def read_labels(group: zarr.Group, path: Path, name: str) -> tuple[np.ndarray, list[str]]:
    """``labels/<name>`` as (float32 (N, C), class names).

    Raises:
        NoLabelsError: the store has no such labels (tiled without annotations).
        StoreCorruptError: a chunk file of them does not decode.
    """
    labels = group.get(LABELS_GROUP)
    names = sorted(labels.array_keys()) if isinstance(labels, zarr.Group) else []
    if name not in names:
        raise NoLabelsError(path, name, names)
    assert isinstance(labels, zarr.Group)
    array = cast("zarr.Array[Any]", labels[name])
    values = read_values(array, path, f"{LABELS_GROUP}/{name}")
    return values, [str(c) for c in cast("list[str]", array.attrs["classes"])]
