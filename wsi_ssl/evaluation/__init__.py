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

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "EncoderSpec": "wsi_ssl.evaluation.config",
    "EvaluationConfig": "wsi_ssl.evaluation.config",
    "PatchTask": "wsi_ssl.evaluation.tasks",
    "TileLabelTask": "wsi_ssl.evaluation.tasks",
    "SlideTask": "wsi_ssl.evaluation.tasks",
    "RetrievalTask": "wsi_ssl.evaluation.tasks",
    "load_images": "wsi_ssl.evaluation.tasks",
    "Estimate": "wsi_ssl.evaluation.statistics",
    "bootstrap_indices": "wsi_ssl.evaluation.statistics",
    "EvaluationReport": "wsi_ssl.evaluation.report",
    "Ranking": "wsi_ssl.evaluation.report",
    "ResultRow": "wsi_ssl.evaluation.report",
    "TaskSummary": "wsi_ssl.evaluation.report",
    "plot_results": "wsi_ssl.evaluation.plot",
    "evaluate_encoders": "wsi_ssl.evaluation.runner",
}

__all__ = [
    "EncoderSpec",
    "Estimate",
    "EvaluationConfig",
    "EvaluationReport",
    "PatchTask",
    "Ranking",
    "ResultRow",
    "RetrievalTask",
    "SlideTask",
    "TaskSummary",
    "TileLabelTask",
    "bootstrap_indices",
    "evaluate_encoders",
    "load_images",
    "plot_results",
]

if TYPE_CHECKING:
    from wsi_ssl.evaluation.config import EncoderSpec, EvaluationConfig
    from wsi_ssl.evaluation.plot import plot_results
    from wsi_ssl.evaluation.report import EvaluationReport, Ranking, ResultRow, TaskSummary
    from wsi_ssl.evaluation.runner import evaluate_encoders
    from wsi_ssl.evaluation.statistics import Estimate, bootstrap_indices
    from wsi_ssl.evaluation.tasks import (
        PatchTask,
        RetrievalTask,
        SlideTask,
        TileLabelTask,
        load_images,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wsi_ssl.evaluation' has no attribute {name!r}")
