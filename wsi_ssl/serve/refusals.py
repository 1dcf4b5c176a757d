"""Why the server refuses a request about one slide, in words for the page's user: its tile
store gone from the archive while the server runs (404), stored tiles whose bytes changed
since tiling (500), a box that misses the slide (400). Each message names the slide by its
file name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from wsi_ssl.errors import (
    RegionOutsideSlideError,
    StoreNotFoundError,
    TileReadError,
    WsiSslError,
)
from wsi_ssl.search.queries import clip_box

__all__ = ["StoreGoneError", "TilesDamagedError", "check_on_slide"]


class StoreGoneError(StoreNotFoundError):
    """An indexed slide whose store is no longer in the archive (moved or deleted): it cannot
    be viewed, searched or labelled until it is tiled again (or removed from the index)."""

    def __init__(self, name: str, path: Path) -> None:
        WsiSslError.__init__(
            self,
            f"{name}: its tiles are gone from the archive (moved or deleted); it cannot be "
            "opened, searched or labelled until it is tiled again or removed from the index",
        )
        self.path = path


class TilesDamagedError(TileReadError):
    """Stored tiles of slide ``name`` that cannot be drawn (``error``: the read's own error,
    with the shard and the check command that prints the re-tile)."""

    def __init__(self, name: str, error: TileReadError) -> None:
        WsiSslError.__init__(
            self,
            f"{name}: its stored tiles are damaged ({error.detail}); re-tile it with the "
            "settings it was tiled with (`wsi-ssl check ROOT --verify-tiles` prints that command)",
        )
        self.path, self.tiles, self.detail = error.path, error.tiles, error.detail


def check_on_slide(name: str, box: Sequence[int], dimensions: Sequence[int]) -> None:
    """RegionOutsideSlideError naming slide ``name`` when level-0 ``box`` (x, y, w, h)
    misses the slide of ``dimensions`` (width, height)."""
    width, height = (int(v) for v in dimensions)
    if clip_box(box, (width, height)) is None:
        raise RegionOutsideSlideError(
            f"{name}: the box lies outside the slide ({width} x {height} px); draw it on the slide"
        )
