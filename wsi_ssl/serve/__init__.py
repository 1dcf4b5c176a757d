"""The pathologist's web page: pick a slide, draw a region, see where else such tissue occurs.

:func:`create_app` builds the FastAPI application over one archive's search index;
``wsi-ssl serve ROOT`` runs it with uvicorn on loopback. Needs the ``serve`` extra
(fastapi, uvicorn); importing this package loads neither until :func:`create_app` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["create_app"]

if TYPE_CHECKING:
    from wsi_ssl.serve.app import create_app


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from wsi_ssl.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'wsi_ssl.serve' has no attribute {name!r}")
