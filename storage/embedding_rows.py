"""A slide's embeddings as read (:class:`Embeddings`) and which of their rows hold vectors.

An embeddings array has one row per tile. An embedding job run with ``skip_flagged_tiles``
neither reads nor encodes the tiles QC flagged: their rows are NaN and the array's attribute
``not_embedded`` = ``{"tiles": [sorted tile numbers], "reason": "qc_flagged",
"qc_thresholds": {...}}`` names them. :meth:`Embeddings.embedded_only` (or
:func:`embedded_rows` for a bare array's attributes) gives the rows that hold vectors: what
search, export, MIL, evaluation and the page use, so no NaN reaches a model, an index or a
metric.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import dask.array as da

__all__ = ["NOT_EMBEDDED", "Embeddings", "embedded_rows", "not_embedded_tiles"]

NOT_EMBEDDED = "not_embedded"
"""Attribute naming the rows that hold no vector (tiles the job left out)."""


def not_embedded_tiles(attrs: Mapping[str, Any]) -> np.ndarray:
    """int64 tile numbers whose rows hold no vector (empty: every row holds one)."""
    record = attrs.get(NOT_EMBEDDED) or {}
    return np.asarray(record.get("tiles", []), dtype=np.int64).reshape(-1)


def embedded_rows(attrs: Mapping[str, Any], n: int) -> np.ndarray | None:
    """Rows of an (n, D) embeddings array that hold vectors, by its attributes; None when
    every row does (the common case, no index array built)."""
    missing = not_embedded_tiles(attrs)
    if not len(missing):
        return None
    keep = np.ones(n, dtype=bool)
    keep[missing[missing < n]] = False
    return np.flatnonzero(keep)


@dataclass
class Embeddings:
    """One slide's vectors from one encoder, row ``i`` belonging to tile ``tiles[i]`` at
    ``coords[i]``; ``tiles`` None: row ``i`` is tile ``i`` (as stored).

    As read, rows of tiles the job left out (``not_embedded``) are NaN: take
    :meth:`embedded_only` before using the vectors.
    """

    slide_id: str
    encoder_id: str
    features: np.ndarray | da.Array
    coords: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    tiles: np.ndarray | None = None

    @property
    def encoder(self) -> dict[str, Any]:
        """The frozen encoder config that made the vectors."""
        return dict(self.attrs.get("encoder", {}))

    @property
    def tile_ids(self) -> np.ndarray:
        """int64 tile number of each row."""
        return np.arange(len(self)) if self.tiles is None else np.asarray(self.tiles)

    @property
    def embedded(self) -> np.ndarray:
        """bool per row: it holds a vector (False only for rows ``not_embedded``)."""
        mask = np.ones(len(self), dtype=bool)
        if self.tiles is None:
            mask[not_embedded_tiles(self.attrs)] = False
        return mask

    @property
    def n_not_embedded(self) -> int:
        """Tiles of the slide whose rows hold no vector."""
        return len(not_embedded_tiles(self.attrs))

    def embedded_only(self) -> Embeddings:
        """The rows that hold vectors (all rows when every tile was embedded), with their
        tile numbers in ``tiles``: what search, export, MIL and evaluation use."""
        if self.tiles is not None:  # already selected
            return self
        rows = embedded_rows(self.attrs, len(self))
        if rows is None:
            return self
        return dataclasses.replace(
            self, features=self.features[rows], coords=np.asarray(self.coords)[rows], tiles=rows
        )

    def select(self, tiles: np.ndarray) -> Embeddings:
        """The rows of these tile numbers (sorted, unique) that hold vectors."""
        emb = self.embedded_only()
        pos = np.flatnonzero(np.isin(emb.tile_ids, tiles))
        return dataclasses.replace(
            emb,
            features=emb.features[pos],
            coords=np.asarray(emb.coords)[pos],
            tiles=emb.tile_ids[pos],
        )

    def __len__(self) -> int:
        return int(self.features.shape[0])
