"""MIL models over bags of tile embeddings, all with ``forward(bag) -> (logits, attention or None)``.

Names resolve lazily: importing this package (or its registry) loads no torch.
"""

from typing import TYPE_CHECKING

from wsi_ssl.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "wsi_ssl.mil.models.abmil": ("ABMIL", "GatedAttention"),
        "wsi_ssl.mil.models.base": ("MILModel", "as_bag"),
        "wsi_ssl.mil.models.meanpool": ("MeanPoolMIL",),
        "wsi_ssl.mil.models.registry": (
            "create_model",
            "list_models",
            "register_model",
        ),
        "wsi_ssl.mil.models.standardize": ("Standardized", "feature_stats"),
        "wsi_ssl.mil.models.transmil": ("PPEG", "TransLayer", "TransMIL"),
    },
)

__all__ = [
    "ABMIL",
    "PPEG",
    "GatedAttention",
    "MILModel",
    "MeanPoolMIL",
    "Standardized",
    "TransLayer",
    "TransMIL",
    "as_bag",
    "create_model",
    "feature_stats",
    "list_models",
    "register_model",
]

if TYPE_CHECKING:
    from wsi_ssl.mil.models.abmil import ABMIL, GatedAttention
    from wsi_ssl.mil.models.base import MILModel, as_bag
    from wsi_ssl.mil.models.meanpool import MeanPoolMIL
    from wsi_ssl.mil.models.registry import create_model, list_models, register_model
    from wsi_ssl.mil.models.standardize import Standardized, feature_stats
    from wsi_ssl.mil.models.transmil import PPEG, TransLayer, TransMIL
