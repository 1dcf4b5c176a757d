"""Whether an indexed slide's store still holds the tiles its index has vectors of.

A slide re-tiled after indexing (``--discard-embeddings``) keeps its old vectors in the index:
hits on it name the indexed tiles, which its store no longer holds. The CLI's ``search`` and the
web page both say so, with the same words.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from wsi_ssl.errors import StoreIncompleteError, StoreNotFoundError, WsiSslError
from wsi_ssl.search.archive import SlideEntry

__all__ = ["retiled_reason", "store_coords_digest"]

ADVICE = "run `wsi-ssl embed` and `wsi-ssl index --add` to search its new tiles"


def retiled_reason(entry: SlideEntry, coords_digest: Callable[[], str]) -> str | None:
    """Why ``entry``'s store no longer holds its indexed tiles (re-tiled since indexing, being
    re-tiled, gone or unreadable), or None when it does, or when the index predates the coords
    hash and cannot tell. ``coords_digest`` reads the store's ``coords_sha256``."""
    if entry.coords_sha256 is None:
        return None
    try:
        digest = coords_digest()
    except StoreIncompleteError:
        return f"{entry.name} is being re-tiled; {ADVICE}"
    except StoreNotFoundError:
        return f"{entry.name}'s store is gone; `wsi-ssl index --add` removes it from the index"
    except (WsiSslError, OSError, KeyError, ValueError) as err:  # damaged: only this slide
        return f"{entry.name}'s store cannot be read ({type(err).__name__}); run `wsi-ssl check`"
    if digest == entry.coords_sha256:
        return None
    return f"{entry.name} was re-tiled after indexing: its boxes are the indexed tiles; {ADVICE}"


def store_coords_digest(root: str | Path, slide_id: str) -> str:
    """The ``coords_sha256`` of ``slide_id``'s store under the archive ``root``."""
    from wsi_ssl.storage import open_store
    from wsi_ssl.storage.embeddings import coords_sha256

    return coords_sha256(np.asarray(open_store(root).slide(slide_id).coords))
