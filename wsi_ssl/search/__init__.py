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

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SearchIndex": "wsi_ssl.search.index",
    "AddSummary": "wsi_ssl.search.index",
    "IndexConfig": "wsi_ssl.search.config",
    "plan_index": "wsi_ssl.search.config",
    "KINDS": "wsi_ssl.search.config",
    "Query": "wsi_ssl.search.results",
    "SearchResult": "wsi_ssl.search.results",
    "TileHit": "wsi_ssl.search.results",
    "RegionHit": "wsi_ssl.search.results",
    "SlideHit": "wsi_ssl.search.results",
    "encode_ids": "wsi_ssl.search.ids",
    "decode_ids": "wsi_ssl.search.ids",
    "MAX_SLIDE_NUMBER": "wsi_ssl.search.ids",
    "MAX_TILE_NUMBER": "wsi_ssl.search.ids",
    "demo_region_gallery": "wsi_ssl.search.demo",
    "evaluate": "wsi_ssl.search.evaluate",
}

__all__ = [
    "KINDS",
    "MAX_SLIDE_NUMBER",
    "MAX_TILE_NUMBER",
    "AddSummary",
    "IndexConfig",
    "Query",
    "RegionHit",
    "SearchIndex",
    "SearchResult",
    "SlideHit",
    "TileHit",
    "decode_ids",
    "demo_region_gallery",
    "encode_ids",
    "evaluate",
    "plan_index",
]

if TYPE_CHECKING:
    from wsi_ssl.search import evaluate
    from wsi_ssl.search.config import KINDS, IndexConfig, plan_index
    from wsi_ssl.search.demo import demo_region_gallery
    from wsi_ssl.search.ids import MAX_SLIDE_NUMBER, MAX_TILE_NUMBER, decode_ids, encode_ids
    from wsi_ssl.search.index import AddSummary, SearchIndex
    from wsi_ssl.search.results import Query, RegionHit, SearchResult, SlideHit, TileHit


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        return module if module.__name__.endswith(f".{name}") else getattr(module, name)
    raise AttributeError(f"module 'wsi_ssl.search' has no attribute {name!r}")
