"""The pretext methods by name: :data:`RECIPES`, on the project's one registry mechanism
(:class:`wsi_ssl.registry.Registry`).

Each built-in method's module registers its :class:`~wsi_ssl.ssl.recipes.base.Recipe` class
with ``@RECIPES.register(name)``; the names are known without importing them (or torch), so
:class:`~wsi_ssl.ssl.config.PretrainConfig` validates ``method`` cheaply. Another method
registers the same way and is then chosen by ``PretrainConfig(method=name)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsi_ssl.registry import Registry

if TYPE_CHECKING:
    from wsi_ssl.ssl.recipes.base import Recipe

__all__ = ["RECIPES"]

RECIPES: Registry[type[Recipe]] = Registry(
    "method",
    builtins={
        "dino": "wsi_ssl.ssl.recipes.dino",
        "dinov2": "wsi_ssl.ssl.recipes.dinov2",
        "mae": "wsi_ssl.ssl.recipes.mae",
    },
    parameter="method",
)
"""Recipe classes by ``PretrainConfig.method``."""
