"""Pretext recipes, one per module, chosen by ``PretrainConfig.method``.

``dino`` (:mod:`.dino`, DINO v1), ``dinov2`` (:mod:`.dinov2`, DINO + iBOT + KoLeo with
Sinkhorn-Knopp centring) and ``mae`` (:mod:`.mae`, masked autoencoding). Each is a
:class:`~wsi_ssl.ssl.recipes.base.Recipe`: it builds the student (and teacher) and computes the
loss of one step; the training loop (:mod:`wsi_ssl.ssl.train`) is shared.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from wsi_ssl.ssl.config import METHODS, PretrainConfig

if TYPE_CHECKING:
    from wsi_ssl.ssl.recipes.base import Recipe

__all__ = ["METHODS", "make_recipe"]

_MODULES = {"dino": "dino", "dinov2": "dinov2", "mae": "mae"}


def make_recipe(config: PretrainConfig) -> Recipe:
    """The recipe of ``config.method``, set up from ``config``."""
    module = importlib.import_module(f"wsi_ssl.ssl.recipes.{_MODULES[config.method]}")
    recipe: Recipe = module.RECIPE(config)
    return recipe
