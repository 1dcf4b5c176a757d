"""wsi-ssl: whole-slide tiling, self-supervised pretraining, embedding, search and MIL.

The public API is re-exported here and resolved lazily, so ``import wsi_ssl`` stays light
(no torch, faiss or openslide loaded until a function that needs them is used).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "TilingConfig": "wsi_ssl.config",
    "open_slide": "wsi_ssl.slide",
    "SlideReader": "wsi_ssl.slide",
    "tile_slide": "wsi_ssl.tiling.batch",
    "tile_slides": "wsi_ssl.tiling.batch",
    "open_store": "wsi_ssl.storage",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.slide import SlideReader, open_slide
    from wsi_ssl.storage import open_store
    from wsi_ssl.tiling.batch import tile_slide, tile_slides


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wsi_ssl' has no attribute {name!r}")
