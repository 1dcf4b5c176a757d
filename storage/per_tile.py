"""Per-tile tables of a slide store: ``qc/<metric>`` scores and ``labels/<name>`` fractions.

``qc/<metric>``: float32 (N,), one quality score per tile; the tiling tasks return their
scores and the job writes each array once (a chunk file per metric rather than per task). ``labels/<name>``: float32 (N, C), each
tile's area fraction of C annotation classes, the class names in the ``classes`` attribute.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from wsi_ssl.errors import NoLabelsError
from wsi_ssl.storage.codecs import CHECKED_ZSTD

QC_GROUP = "qc"
LABELS_GROUP = "labels"

ValuesReader = Callable[[str], np.ndarray]
"""Reads a store's member array by its path (``qc/focus``), checked: ``SlideStore._values``."""


QC_CHUNK = 1 << 16
"""Scores per chunk of a ``qc/<metric>`` array (one chunk for a slide of up to 65,536 tiles)."""


def write_qc(group: zarr.Group, scores: Mapping[str, np.ndarray]) -> None:
    """Store ``qc/<metric>``: float32 (N,) per metric, written once after extraction."""
    qc = group.require_group(QC_GROUP)
    for metric, values in scores.items():
        data = np.asarray(values, dtype=np.float32)
        chunks = (max(1, min(len(data), QC_CHUNK)),)
        qc.create_array(metric, data=data, chunks=chunks, compressors=CHECKED_ZSTD)


def read_qc(group: zarr.Group, values: ValuesReader) -> dict[str, np.ndarray]:
    """Every ``qc/<metric>`` of the store ``group`` as float32 (N,), read by ``values``; empty
    when the store has none.

    Raises:
        StoreCorruptError: a chunk file of a metric does not decode, or was lost (its values
            are not those recorded at completion).
    """
    if QC_GROUP not in group:
        return {}
    qc = cast(zarr.Group, group[QC_GROUP])
    return {name: values(f"{QC_GROUP}/{name}") for name in sorted(qc.array_keys())}


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


def read_labels(
    group: zarr.Group, path: Path, name: str, values: ValuesReader
) -> tuple[np.ndarray, list[str]]:
    """``labels/<name>`` of the store ``group`` (at ``path``) as (float32 (N, C), class
    names), read by ``values``.

    Raises:
        NoLabelsError: the store has no such labels (tiled without annotations).
        StoreCorruptError: a chunk file of them does not decode, or was lost (their values
            are not those recorded at completion).
    """
    labels = group.get(LABELS_GROUP)
    names = sorted(labels.array_keys()) if isinstance(labels, zarr.Group) else []
    if name not in names:
        raise NoLabelsError(path, name, names)
    assert isinstance(labels, zarr.Group)
    array = cast("zarr.Array[Any]", labels[name])
    fractions = values(f"{LABELS_GROUP}/{name}")
    return fractions, [str(c) for c in cast("list[str]", array.attrs["classes"])]
