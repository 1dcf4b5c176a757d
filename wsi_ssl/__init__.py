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

from typing import TYPE_CHECKING

from wsi_ssl.lazy import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "wsi_ssl.config": ("TilingConfig",),
        "wsi_ssl.slide": ("open_slide", "SlideReader"),
        "wsi_ssl.tiling.batch": ("tile_slide", "tile_slides"),
        "wsi_ssl.storage": ("open_store",),
        "wsi_ssl.ssl.config": ("PretrainConfig",),
        "wsi_ssl.ssl.train": ("pretrain",),
        "wsi_ssl.ssl.encoder": ("load_encoder",),
        "wsi_ssl.encoders": ("create_encoder", "encoders"),
        "wsi_ssl.embedding.config": ("EmbedConfig",),
        "wsi_ssl.embedding.job": ("embed",),
        "wsi_ssl.embedding": ("export_embeddings", "embedding"),
        "wsi_ssl.search.config": ("IndexConfig",),
        "wsi_ssl.search.index": ("SearchIndex",),
        "wsi_ssl.mil.config": ("MILConfig",),
        "wsi_ssl.mil": ("mil",),  # subpackages are attributes too: wsi_ssl.mil.train(...)
        "wsi_ssl.search": ("search",),
        "wsi_ssl.ssl": ("ssl",),
    },
)

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
