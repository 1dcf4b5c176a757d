"""Retrieval tasks: mMV@k and precision@k of a flat index per encoder
(:mod:`wsi_ssl.search.evaluate`), leaving the query slide out, or, when the labels CSV has a
``patient`` column, every slide of the query's patient (leave one patient out: a patient's
re-scans or copies must not vote for each other)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl.evaluation.config import EvaluationConfig
from wsi_ssl.evaluation.preflight import check_mmv_k
from wsi_ssl.evaluation.probes import split_digest
from wsi_ssl.evaluation.report import Scores, TaskSummary
from wsi_ssl.evaluation.statistics import balanced_accuracy, pooled_mean
from wsi_ssl.evaluation.tasks import LabelledSlides, RetrievalTask, task_name

if TYPE_CHECKING:
    from wsi_ssl.encoders import Encoder
    from wsi_ssl.mil.labels import LabelRow

__all__ = ["patients_of", "retrieval_scores"]


def patients_of(rows: Sequence[LabelRow]) -> dict[str, str] | None:
    """Slide id -> patient when any row names a patient (a slide without one is its own
    patient); None when none does."""
    if not any(r.patient for r in rows):
        return None
    return {r.slide: r.patient or f"slide {r.slide}" for r in rows}


@contextlib.contextmanager
def _scratch_index(root: Path, encoder_id: str, slides: list[str]) -> Iterator[Any]:
    """A flat (exact) index of ``slides``, removed afterwards so that the archive's own
    indexes are the only ones left (commands that open "the only index" keep working)."""
    import os

    from wsi_ssl.search import SearchIndex
    from wsi_ssl.storage.index_files import remove_index

    name = f"eval-{encoder_id}-{os.getpid()}"
    try:
        yield SearchIndex.build(root, encoder_id, name=name, slides=slides, kind="flat")
    finally:
        remove_index(root, name)


def retrieval_scores(
    task: RetrievalTask,
    encoders: Sequence[tuple[str, Encoder]],
    config: EvaluationConfig,
    labelled: LabelledSlides,
    notes: list[str],
) -> tuple[TaskSummary, list[Scores]]:
    """The task's summary and its mMV@k and precision@k outputs per encoder."""
    from wsi_ssl.mil.labels import sort_classes
    from wsi_ssl.search.evaluate import majority_vote, precision_at_k

    rows = labelled.table.rows
    patients = patients_of(rows)
    check_mmv_k(len(rows), patients, config, task.labels)  # again: slides may be left out
    truth = {r.slide: r.label for r in rows}
    classes = sort_classes(truth.values())
    y = np.array([classes.index(r.label) for r in rows], dtype=np.int64)
    way = "leave-one-slide-out"
    if patients:
        way = "leave-one-patient-out (a query's patient's other slides never vote or match)"
    summary = TaskSummary(
        task_name(task),
        task.kind,
        str(task.labels),
        len(rows),
        tuple(classes),
        0,
        split_digest(np.zeros(len(rows))),
        (*notes, way),
    )
    votes: dict[str, np.ndarray] = {}
    precision: dict[str, np.ndarray] = {}  # per slide: summed precision, query tiles
    for label, enc in encoders:
        with _scratch_index(task.root, enc.encoder_id, labelled.slide_ids) as index:
            mv = majority_vote(index, truth, k=config.mmv_k, seed=config.seed, patients=patients)
            pk = precision_at_k(
                index, truth, k=config.precision_k, seed=config.seed, patients=patients
            )
        predicted = {p["slide_id"]: p["predicted"] for p in mv["per_slide"]}
        votes[label] = np.array(
            [classes.index(p) if (p := predicted[r.slide]) in classes else -1 for r in rows]
        )
        per_slide = pk["per_slide"]
        precision[label] = np.array(
            [
                [s["precision"] * s["queries"], s["queries"]]
                for s in (per_slide.get(r.slide, {"precision": 0.0, "queries": 0}) for r in rows)
            ]
        )
    ids = {lab: e.encoder_id for lab, e in encoders}
    return summary, [
        Scores(summary, "search", f"mmv@{config.mmv_k}", ids, y, balanced_accuracy, votes),
        Scores(
            summary, "search", f"precision@{config.precision_k}", ids, y, pooled_mean, precision
        ),
    ]
