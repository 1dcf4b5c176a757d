"""What an index build or update says to do when the archive cannot give it what it asks.

* :func:`only_damaged_advice`: no encoder's embeddings because the only slide stores are
  damaged: not "embed" (it cannot open them) but the check that prints the tile command.
* :func:`scale_error`, :func:`stain_error`: slides that cannot share one index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wsi_ssl.listing import first_few
from wsi_ssl.stain_settings import stain_text
from wsi_ssl.storage.resolve import damaged_stores_advice

if TYPE_CHECKING:
    from wsi_ssl.storage import Archive

__all__ = ["only_damaged_advice", "scale_error", "stain_error"]


def only_damaged_advice(archive: Archive) -> str:
    """What to do when the archive's only slide stores are damaged ("" when it has a complete
    one, or none damaged): :func:`~wsi_ssl.storage.resolve.damaged_stores_advice`."""
    scan = archive.scan()
    damaged = [str(getattr(err, "path", err)) for err in scan.damaged]
    if scan.complete or not damaged:
        return ""
    return damaged_stores_advice(archive.root, damaged)


def scale_error(archive: Archive, tiling: dict[str, Any] | None, mismatched: list[str]) -> str:
    """The error of slides tiled at another scale than the index's ``tiling``."""
    return (
        f"{archive.root}: slides tiled at another scale than the index's "
        f"{tiling['mpp'] if tiling else '?'} µm/px, {tiling['tile_size'] if tiling else '?'} px: "
        f"{first_few(mismatched)}; tile every slide "
        "of one index with the same mpp and tile_size, or index them apart (slides= and a name= "
        "of its own: a second index of the same name replaces the first)"
    )


def stain_error(
    archive: Archive, stain: dict[str, Any] | None, first: str, others: list[str], alike: int
) -> str:
    """The error of slides embedded with another stain normalisation than ``first``'s."""
    said = stain_text(stain) + ("" if first == "the index" else f", as {alike} slide(s) are")
    return (
        f"{archive.root}: {len(others)} slide(s) embedded with another stain normalisation than "
        f"{first} ({said}): {first_few(others)}; embed them alike (`wsi-ssl embed --no-resume` "
        "with the same settings), or index them apart (slides= and a name= of its own: a second "
        "index of the same name replaces the first)"
    )
