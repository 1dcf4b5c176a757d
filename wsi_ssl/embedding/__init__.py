"""The embedding stage: the batch job over an archive and export for MIL code.

``wsi_ssl.embed(root, encoder)`` is :func:`embed`, re-exported. Names resolve lazily, so the
CLI can read the config types without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "EmbedConfig": "wsi_ssl.embedding.config",
    "EXPORT_FORMATS": "wsi_ssl.embedding.mil_files",
    "ExportResult": "wsi_ssl.embedding.mil_files",
    "export": "wsi_ssl.embedding.mil_files",
    "EmbedSummary": "wsi_ssl.embedding.job",
    "SlideEmbedResult": "wsi_ssl.embedding.job",
    "embed": "wsi_ssl.embedding.job",
    "embed_for_demo": "wsi_ssl.embedding.job",
    "embed_slide": "wsi_ssl.embedding.job",
}

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

if TYPE_CHECKING:
    from wsi_ssl.embedding.config import EmbedConfig
    from wsi_ssl.embedding.job import (
        EmbedSummary,
        SlideEmbedResult,
        embed,
        embed_for_demo,
        embed_slide,
    )
    from wsi_ssl.embedding.mil_files import EXPORT_FORMATS, ExportResult, export

    export_embeddings = export


def __getattr__(name: str) -> Any:
    if name == "export_embeddings":  # the name wsi_ssl re-exports (``export`` is too generic)
        name = "export"
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wsi_ssl.embedding' has no attribute {name!r}")
