"""wsi-ssl: whole-slide tiling, self-supervised pretraining, embedding, search and MIL.

The public API is re-exported here and resolved lazily, so ``import wsi_ssl`` stays light
(no torch, faiss or openslide loaded until a function that needs them is used)::

    wsi_ssl.tile_slides(paths, "archive")               # slides -> Zarr tile stores
    run = wsi_ssl.pretrain("archive", wsi_ssl.PretrainConfig.preset("cpu-small"), out="run")
    wsi_ssl.embed("archive", run.out_dir)               # tiles -> embeddings/<encoder_id>
    index = wsi_ssl.SearchIndex.build("archive", encoder_id)
    wsi_ssl.mil.train(...)                              # slide labels -> attention MIL
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
    "PretrainConfig": "wsi_ssl.ssl.config",
    "pretrain": "wsi_ssl.ssl.train",
    "load_encoder": "wsi_ssl.ssl.encoder",
    "create_encoder": "wsi_ssl.encoders",
    "EmbedConfig": "wsi_ssl.embedding.config",
    "embed": "wsi_ssl.embedding.job",
    "export_embeddings": "wsi_ssl.embedding",
    "IndexConfig": "wsi_ssl.search.config",
    "SearchIndex": "wsi_ssl.search.index",
    "MILConfig": "wsi_ssl.mil.config",
}
_SUBPACKAGES = ("mil", "search", "ssl", "encoders", "embedding")

__all__ = [
    "EmbedConfig",
    "IndexConfig",
    "MILConfig",
    "PretrainConfig",
    "SearchIndex",
    "SlideReader",
    "TilingConfig",
    "__version__",
    "create_encoder",
    "embed",
    "export_embeddings",
    "load_encoder",
    "open_slide",
    "open_store",
    "pretrain",
    "tile_slide",
    "tile_slides",
]

if TYPE_CHECKING:
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.embedding import export_embeddings
    from wsi_ssl.embedding.config import EmbedConfig
    from wsi_ssl.embedding.job import embed
    from wsi_ssl.encoders import create_encoder
    from wsi_ssl.mil.config import MILConfig
    from wsi_ssl.search.config import IndexConfig
    from wsi_ssl.search.index import SearchIndex
    from wsi_ssl.slide import SlideReader, open_slide
    from wsi_ssl.ssl.config import PretrainConfig
    from wsi_ssl.ssl.encoder import load_encoder
    from wsi_ssl.ssl.train import pretrain
    from wsi_ssl.storage import open_store
    from wsi_ssl.tiling.batch import tile_slide, tile_slides


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"wsi_ssl.{name}")
    raise AttributeError(f"module 'wsi_ssl' has no attribute {name!r}")
