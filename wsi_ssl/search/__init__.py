"""Similarity search over an archive's tile embeddings: "where else have we seen tissue like this?"

* :class:`SearchIndex`: build / open / ``add`` / ``remove`` a FAISS index stored under
  ``ROOT/index/<name>/`` (:mod:`wsi_ssl.storage.index_files`), and query it by tile, region,
  image or whole slide; results as tables, JSON and gallery PNGs.
* :class:`IndexConfig`: kind (``auto``, ``flat``, ``hnsw``, ``ivfpq``) and the parameters
  derived from the data size (:func:`plan_index`).
* :mod:`wsi_ssl.search.evaluate`: mMV@k, precision@k and recall@k.
* :func:`encode_ids` / :func:`decode_ids`: ``slide_number << 32 | tile_number``.
* :func:`demo_region_gallery`: a region query on the demo archive that writes a gallery PNG.

Names resolve lazily, so importing this package loads neither faiss nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsi_ssl.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "wsi_ssl.search.index": ("SearchIndex",),
        "wsi_ssl.search.archive": ("AddSummary", "ArchiveSource", "SlideEntry"),
        "wsi_ssl.search.config": ("IndexConfig", "plan_index", "KINDS"),
        "wsi_ssl.search.results": ("Query", "SearchResult", "TileHit", "RegionHit", "SlideHit"),
        "wsi_ssl.search.ids": ("encode_ids", "decode_ids", "MAX_SLIDE_NUMBER", "MAX_TILE_NUMBER"),
        "wsi_ssl.search.gallery": ("render_gallery",),
        "wsi_ssl.search.demo": ("demo_region_gallery",),
        "wsi_ssl.search.evaluate": ("evaluate",),
    },
)

__all__ = [
    "KINDS",
    "MAX_SLIDE_NUMBER",
    "MAX_TILE_NUMBER",
    "AddSummary",
    "ArchiveSource",
    "IndexConfig",
    "Query",
    "RegionHit",
    "SearchIndex",
    "SearchResult",
    "SlideEntry",
    "SlideHit",
    "TileHit",
    "decode_ids",
    "demo_region_gallery",
    "encode_ids",
    "evaluate",
    "plan_index",
    "render_gallery",
]

if TYPE_CHECKING:
    from wsi_ssl.search import evaluate
    from wsi_ssl.search.archive import AddSummary, ArchiveSource, SlideEntry
    from wsi_ssl.search.config import KINDS, IndexConfig, plan_index
    from wsi_ssl.search.demo import demo_region_gallery
    from wsi_ssl.search.gallery import render_gallery
    from wsi_ssl.search.ids import MAX_SLIDE_NUMBER, MAX_TILE_NUMBER, decode_ids, encode_ids
    from wsi_ssl.search.index import SearchIndex
    from wsi_ssl.search.results import Query, RegionHit, SearchResult, SlideHit, TileHit
