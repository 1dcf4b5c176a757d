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

from typing import TYPE_CHECKING

from wsi_ssl.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "wsi_ssl.mil.config": ("MILConfig", "BUILTIN_MODELS"),
        "wsi_ssl.mil.labels": ("LabelTable", "read_labels"),
        "wsi_ssl.mil.matching": ("LabelledSlide", "MatchReport", "match_labels"),
        "wsi_ssl.mil.splits": ("assign_folds",),
        "wsi_ssl.mil.data": ("BagDataset", "read_bag"),
        "wsi_ssl.mil.metrics": ("classification_metrics",),
        "wsi_ssl.mil.models": (
            "MILModel",
            "ABMIL",
            "TransMIL",
            "MeanPoolMIL",
            "create_model",
            "list_models",
            "register_model",
        ),
        "wsi_ssl.mil.learners": (
            "Learner",
            "get_learner",
            "learner_names",
            "register_learner",
        ),
        "wsi_ssl.mil.retrieval": ("RetrievalClassifier", "slide_vector"),
        "wsi_ssl.mil.training": ("TrainResult", "train"),
        "wsi_ssl.mil.run": ("MILRun", "MILPrediction", "load"),
        "wsi_ssl.mil.prediction": ("PredictResult", "predict"),
        "wsi_ssl.mil.explain": (
            "attention_heatmap",
            "tile_gallery",
            "attention_geojson",
        ),
        "wsi_ssl.mil.demo": ("MILDemoResult", "mil_for_demo"),
    },
)

__all__ = [
    "ABMIL",
    "BUILTIN_MODELS",
    "BagDataset",
    "LabelTable",
    "LabelledSlide",
    "Learner",
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
    "get_learner",
    "learner_names",
    "list_models",
    "load",
    "match_labels",
    "mil_for_demo",
    "predict",
    "read_bag",
    "read_labels",
    "register_learner",
    "register_model",
    "slide_vector",
    "tile_gallery",
    "train",
]

if TYPE_CHECKING:
    from wsi_ssl.mil.config import BUILTIN_MODELS, MILConfig
    from wsi_ssl.mil.data import BagDataset, read_bag
    from wsi_ssl.mil.demo import MILDemoResult, mil_for_demo
    from wsi_ssl.mil.explain import attention_geojson, attention_heatmap, tile_gallery
    from wsi_ssl.mil.labels import LabelTable, read_labels
    from wsi_ssl.mil.learners import Learner, get_learner, learner_names, register_learner
    from wsi_ssl.mil.matching import LabelledSlide, MatchReport, match_labels
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
