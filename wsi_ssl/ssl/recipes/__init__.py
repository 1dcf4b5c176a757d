"""Pretext recipes, one per module, chosen by ``PretrainConfig.method`` (registered in
:data:`wsi_ssl.ssl.methods.RECIPES`).

``dino`` (:mod:`.dino`, DINO v1), ``dinov2`` (:mod:`.dinov2`, DINO + iBOT + KoLeo with
Sinkhorn-Knopp centring) and ``mae`` (:mod:`.mae`, masked autoencoding). Each is a
:class:`~wsi_ssl.ssl.recipes.base.Recipe`: it builds the student (and teacher) and computes the
loss of one step; the training loop (:mod:`wsi_ssl.ssl.train`) is shared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsi_ssl.ssl.config import PretrainConfig
from wsi_ssl.ssl.methods import RECIPES

if TYPE_CHECKING:
    from wsi_ssl.ssl.recipes.base import Recipe

__all__ = ["RECIPES", "make_recipe"]


def make_recipe(config: PretrainConfig) -> Recipe:
    """The recipe of ``config.method``, set up from ``config``."""
    return RECIPES.get(config.method)(config)
