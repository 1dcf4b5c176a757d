"""The embedding stage: the batch job over an archive and export for MIL code.

``wsi_ssl.embed(root, encoder)`` is :func:`embed`, re-exported. Names resolve lazily, so the
CLI can read the config types without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wsi_ssl.lazy import lazy_exports

_getattr, __dir__ = lazy_exports(
    __name__,
    {
        "wsi_ssl.embedding.config": ("EmbedConfig",),
        "wsi_ssl.embedding.mil_files": ("EXPORT_FORMATS", "ExportResult", "export"),
        "wsi_ssl.embedding.summary": ("EmbedSummary",),
        "wsi_ssl.embedding.job": ("embed", "embed_for_demo", "embed_slide"),
        "wsi_ssl.embedding.devices": ("embed_on_devices",),
    },
)

__all__ = [
    "EXPORT_FORMATS",
    "EmbedConfig",
    "EmbedSummary",
    "ExportResult",
    "embed",
    "embed_for_demo",
    "embed_on_devices",
    "embed_slide",
    "export",
    "export_embeddings",
]

if TYPE_CHECKING:
    from wsi_ssl.embedding.config import EmbedConfig
    from wsi_ssl.embedding.devices import embed_on_devices
    from wsi_ssl.embedding.job import embed, embed_for_demo, embed_slide
    from wsi_ssl.embedding.mil_files import EXPORT_FORMATS, ExportResult, export
    from wsi_ssl.embedding.summary import EmbedSummary

    export_embeddings = export


def __getattr__(name: str) -> Any:
    """The lazy exports, plus ``export_embeddings`` (the name ``wsi_ssl`` re-exports, as
    ``export`` is too generic there)."""
    return _getattr("export" if name == "export_embeddings" else name)
