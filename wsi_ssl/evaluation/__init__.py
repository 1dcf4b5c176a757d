"""Which representation fits a task: encoders x tasks on the same data, folds and seeds.

    >>> from wsi_ssl.evaluation import PatchTask, SlideTask, evaluate_encoders
    >>> report = evaluate_encoders(
    ...     ["resnet18,weights=random", "runs/dino"],
    ...     [PatchTask("labelled/"), SlideTask("archive", "labels.csv")],
    ...     out="evaluation",
    ... )
    >>> print(report.table())              # value [bootstrap interval] per encoder
    >>> report.rows                        # tuple of ResultRow (frozen dataclasses)
    >>> [r.sentence() for r in report.rankings]

Names resolve lazily, so importing ``wsi_ssl.evaluation`` loads no torch, faiss or sklearn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsi_ssl.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "wsi_ssl.evaluation.config": ("EncoderSpec", "EvaluationConfig"),
        "wsi_ssl.evaluation.tasks": (
            "PatchTask",
            "RegionLabelTask",
            "RetrievalTask",
            "SlideTask",
            "TileLabelTask",
            "load_images",
        ),
        "wsi_ssl.evaluation.statistics": ("Estimate", "bootstrap_indices"),
        "wsi_ssl.evaluation.report": ("EvaluationReport", "Ranking", "ResultRow", "TaskSummary"),
        "wsi_ssl.evaluation.plot": ("plot_results",),
        "wsi_ssl.evaluation.regions": ("load_region_labels",),
        "wsi_ssl.evaluation.runner": ("evaluate_encoders",),
    },
)

__all__ = [
    "EncoderSpec",
    "Estimate",
    "EvaluationConfig",
    "EvaluationReport",
    "PatchTask",
    "Ranking",
    "RegionLabelTask",
    "ResultRow",
    "RetrievalTask",
    "SlideTask",
    "TaskSummary",
    "TileLabelTask",
    "bootstrap_indices",
    "evaluate_encoders",
    "load_images",
    "load_region_labels",
    "plot_results",
]

if TYPE_CHECKING:
    from wsi_ssl.evaluation.config import EncoderSpec, EvaluationConfig
    from wsi_ssl.evaluation.plot import plot_results
    from wsi_ssl.evaluation.regions import load_region_labels
    from wsi_ssl.evaluation.report import EvaluationReport, Ranking, ResultRow, TaskSummary
    from wsi_ssl.evaluation.runner import evaluate_encoders
    from wsi_ssl.evaluation.statistics import Estimate, bootstrap_indices
    from wsi_ssl.evaluation.tasks import (
        PatchTask,
        RegionLabelTask,
        RetrievalTask,
        SlideTask,
        TileLabelTask,
        load_images,
    )
