"""The embedding stage: the batch job over an archive and export for MIL code.

``wsi_ssl.embed(root, encoder)`` is :func:`embed`, re-exported.
"""

from __future__ import annotations

from wsi_ssl.embedding.config import EmbedConfig
from wsi_ssl.embedding.export import EXPORT_FORMATS, ExportResult, export
from wsi_ssl.embedding.job import EmbedSummary, SlideEmbedResult, embed, embed_for_demo, embed_slide

export_embeddings = export  # the name wsi_ssl re-exports (``export`` alone is too generic)

__all__ = [
    "EXPORT_FORMATS",
    "EmbedConfig",
    "EmbedSummary",
    "ExportResult",
    "SlideEmbedResult",
    "embed",
    "embed_for_demo",
    "embed_slide",
    "export",
    "export_embeddings",
]
