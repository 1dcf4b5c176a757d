"""Slide-level multiple-instance learning on tile embeddings.

Gated attention MIL (Ilse et al. 2018) by default, a TransMIL-style transformer (Shao et al.
2021), mean pooling and a FAISS nearest-slide retrieval baseline; patient-grouped, stratified
k-fold cross-validation; prediction with attention heatmaps, top-tile galleries and GeoJSON
for QuPath.

    >>> from wsi_ssl import mil
    >>> result = mil.train("archive", "labels.csv", "resnet18-…", "runs/tumour")
    >>> run = mil.load("runs/tumour")
    >>> pred = run.predict(bag)            # bag: (N, D) tile embeddings
    >>> pred.probabilities, pred.attention

Names are resolved lazily, so importing ``wsi_ssl.mil`` (or its config) loads no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "MILConfig": "wsi_ssl.mil.config",
    "BUILTIN_MODELS": "wsi_ssl.mil.config",
    "LabelTable": "wsi_ssl.mil.labels",
    "LabelledSlide": "wsi_ssl.mil.labels",
    "MatchReport": "wsi_ssl.mil.labels",
    "read_labels": "wsi_ssl.mil.labels",
    "match_labels": "wsi_ssl.mil.labels",
    "assign_folds": "wsi_ssl.mil.splits",
    "BagDataset": "wsi_ssl.mil.data",
    "read_bag": "wsi_ssl.mil.data",
    "classification_metrics": "wsi_ssl.mil.metrics",
    "MILModel": "wsi_ssl.mil.models",
    "ABMIL": "wsi_ssl.mil.models",
    "TransMIL": "wsi_ssl.mil.models",
    "MeanPoolMIL": "wsi_ssl.mil.models",
    "create_model": "wsi_ssl.mil.models",
    "list_models": "wsi_ssl.mil.models",
    "register_model": "wsi_ssl.mil.models",
    "RetrievalClassifier": "wsi_ssl.mil.retrieval",
    "slide_vector": "wsi_ssl.mil.retrieval",
    "TrainResult": "wsi_ssl.mil.training",
    "train": "wsi_ssl.mil.training",
    "MILRun": "wsi_ssl.mil.run",
    "MILPrediction": "wsi_ssl.mil.run",
    "load": "wsi_ssl.mil.run",
    "PredictResult": "wsi_ssl.mil.prediction",
    "predict": "wsi_ssl.mil.prediction",
    "attention_heatmap": "wsi_ssl.mil.explain",
    "tile_gallery": "wsi_ssl.mil.explain",
    "attention_geojson": "wsi_ssl.mil.explain",
    "write_bag_store": "wsi_ssl.mil.bags",
    "MILDemoResult": "wsi_ssl.mil.demo",
    "mil_for_demo": "wsi_ssl.mil.demo",
}

__all__ = [
    "ABMIL",
    "BUILTIN_MODELS",
    "BagDataset",
    "LabelTable",
    "LabelledSlide",
    "MILConfig",
    "MILDemoResult",
    "MILModel",
    "MILPrediction",
    "MILRun",
    "MatchReport",
    "MeanPoolMIL",
    "PredictResult",
    "RetrievalClassifier",
    "TrainResult",
    "TransMIL",
    "assign_folds",
    "attention_geojson",
    "attention_heatmap",
    "classification_metrics",
    "create_model",
    "list_models",
    "load",
    "match_labels",
    "mil_for_demo",
    "predict",
    "read_bag",
    "read_labels",
    "register_model",
    "slide_vector",
    "tile_gallery",
    "train",
    "write_bag_store",
]

if TYPE_CHECKING:
    from wsi_ssl.mil.bags import write_bag_store
    from wsi_ssl.mil.config import BUILTIN_MODELS, MILConfig
    from wsi_ssl.mil.data import BagDataset, read_bag
    from wsi_ssl.mil.demo import MILDemoResult, mil_for_demo
    from wsi_ssl.mil.explain import attention_geojson, attention_heatmap, tile_gallery
    from wsi_ssl.mil.labels import LabelledSlide, LabelTable, MatchReport, match_labels, read_labels
    from wsi_ssl.mil.metrics import classification_metrics
    from wsi_ssl.mil.models import (
        ABMIL,
        MeanPoolMIL,
        MILModel,
        TransMIL,
        create_model,
        list_models,
        register_model,
    )
    from wsi_ssl.mil.prediction import PredictResult, predict
    from wsi_ssl.mil.retrieval import RetrievalClassifier, slide_vector
    from wsi_ssl.mil.run import MILPrediction, MILRun, load
    from wsi_ssl.mil.splits import assign_folds
    from wsi_ssl.mil.training import TrainResult, train


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wsi_ssl.mil' has no attribute {name!r}")
