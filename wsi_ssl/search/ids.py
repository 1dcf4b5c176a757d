"""64-bit FAISS ids: the slide number in the high bits, the tile number in the low 32.

``id = (slide_number << 32) | tile_number`` with ``0 <= tile_number < 2**32`` and
``0 <= slide_number < 2**31``, so every id is a non-negative int64 (FAISS uses -1 for "no
result") and a hit maps to (slide, tile) with two bit operations. Tile numbers are row
numbers of a slide's ``coords`` / ``embeddings`` arrays; slide numbers are assigned by the
index itself, in the order slides are added, and never reused (the index's id map
``slides.json`` maps them to slide ids), so adding slides only appends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from wsi_ssl.errors import ConfigError

__all__ = [
    "MAX_SLIDE_NUMBER",
    "MAX_TILE_NUMBER",
    "TILE_BITS",
    "decode_ids",
    "encode_ids",
    "exclusion_selector",
    "slide_id_range",
]

TILE_BITS = 32
SLIDE_BITS = 31
MAX_TILE_NUMBER = (1 << TILE_BITS) - 1
MAX_SLIDE_NUMBER = (1 << SLIDE_BITS) - 1
_TILE_MASK = np.int64(MAX_TILE_NUMBER)


def encode_ids(slide_number: int | np.ndarray, tile_numbers: np.ndarray | int) -> np.ndarray:
    """int64 ids of ``tile_numbers`` on ``slide_number`` (broadcast together).

    Raises:
        ConfigError: a slide number outside ``[0, 2**31)`` or a tile number outside
            ``[0, 2**32)``.
    """
    slides = np.asarray(slide_number, dtype=np.int64)
    tiles = np.asarray(tile_numbers, dtype=np.int64)
    if slides.size and (slides.min() < 0 or slides.max() > MAX_SLIDE_NUMBER):
        raise ConfigError(f"slide numbers must be in [0, {MAX_SLIDE_NUMBER}]")
    if tiles.size and (tiles.min() < 0 or tiles.max() > MAX_TILE_NUMBER):
        raise ConfigError(
            f"tile numbers must be in [0, {MAX_TILE_NUMBER}]; a slide has at most 2**32 tiles"
        )
    return (slides << TILE_BITS) | tiles


def decode_ids(ids: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """(slide_numbers, tile_numbers) of int64 ids; -1 (no result) decodes to (-1, -1)."""
    arr = np.asarray(ids, dtype=np.int64)
    valid = arr >= 0
    slides = np.where(valid, arr >> TILE_BITS, -1)
    tiles = np.where(valid, arr & _TILE_MASK, -1)
    return slides, tiles


def slide_id_range(slide_number: int) -> tuple[int, int]:
    """``[lo, hi)``: the ids a slide can have (for FAISS ``IDSelectorRange``)."""
    if not 0 <= slide_number <= MAX_SLIDE_NUMBER:
        raise ConfigError(f"slide numbers must be in [0, {MAX_SLIDE_NUMBER}]")
    lo = int(slide_number) << TILE_BITS
    return lo, lo + (1 << TILE_BITS)


def exclusion_selector(
    tombstones: np.ndarray | None, exclude_slides: Sequence[int]
) -> tuple[Any, list[Any]]:
    """A FAISS ``IDSelector`` leaving out the ``tombstones`` ids and every tile of the
    ``exclude_slides`` numbers (None when nothing is left out), and the FAISS objects that
    must stay alive while it is used."""
    import faiss

    parts: list[Any] = []
    if tombstones is not None:
        parts.append(faiss.IDSelectorBatch(tombstones))
    for first, last in slide_runs(exclude_slides):
        parts.append(faiss.IDSelectorRange(slide_id_range(first)[0], slide_id_range(last)[1]))
    keep: list[Any] = list(parts)
    if not parts:
        return None, keep
    while len(parts) > 1:  # a balanced tree of unions: shallow however many parts
        pairs = [faiss.IDSelectorOr(a, b) for a, b in zip(parts[::2], parts[1::2], strict=False)]
        keep.extend(pairs)
        parts = pairs + ([parts[-1]] if len(parts) % 2 else [])
    selector = faiss.IDSelectorNot(parts[0])
    keep.append(selector)
    return selector, keep


def slide_runs(numbers: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive slide numbers merged into ``(first, last)`` runs: one id range each, so
    a filter that leaves out most of an archive costs a few ranges, not one per slide."""
    runs: list[tuple[int, int]] = []
    for number in sorted({int(n) for n in numbers}):
        if runs and number == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], number)
        else:
            runs.append((number, number))
    return runs
