"""MIL models over bags of tile embeddings, all with ``forward(bag) -> (logits, attention)``."""

from wsi_ssl.mil.models.abmil import ABMIL, GatedAttention
from wsi_ssl.mil.models.base import MILModel, as_bag
from wsi_ssl.mil.models.meanpool import MeanPoolMIL
from wsi_ssl.mil.models.registry import create_model, list_models, register_model
from wsi_ssl.mil.models.standardize import Standardized, feature_stats
from wsi_ssl.mil.models.transmil import PPEG, TransLayer, TransMIL

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
