"""Zarr slide stores, the catalog and index files (installed as ``wsi_ssl.storage``)."""

from wsi_ssl.storage.archive import Archive, open_store
from wsi_ssl.storage.catalog import Catalog, CatalogEntry
from wsi_ssl.storage.fingerprint import fingerprint_file, slide_id_from_fingerprint
from wsi_ssl.storage.slide_store import (
    SCHEMA_VERSION,
    STATUS_COMPLETE,
    STATUS_WRITING,
    SlideStore,
)

__all__ = [
    "SCHEMA_VERSION",
    "STATUS_COMPLETE",
    "STATUS_WRITING",
    "Archive",
    "Catalog",
    "CatalogEntry",
    "SlideStore",
    "fingerprint_file",
    "open_store",
    "slide_id_from_fingerprint",
]
