"""The MIL step of ``wsi-ssl demo``: a small cross-validated ABMIL run and one heatmap."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wsi_ssl.errors import LabelsError
from wsi_ssl.mil.config import MILConfig
from wsi_ssl.mil.labels import LabelTable, read_labels
from wsi_ssl.mil.matching import MatchReport, match_labels

__all__ = ["DEMO_CONFIG", "MILDemoResult", "mil_for_demo"]

DEMO_CONFIG = MILConfig(
    model="abmil",
    hidden_dim=128,
    attention_dim=64,
    dropout=0.1,
    folds=3,
    val_fraction=0.0,  # a handful of slides per fold: early stopping on one or two is noise
    epochs=30,
    lr=5e-4,
    weight_decay=1e-4,
    device="cpu",
    threads=1,
)
"""Small and quick: a few demo slides train in seconds on a CPU, a fixed number of epochs."""


@dataclass
class MILDemoResult:
    """The demo's MIL outcome: the run, its metrics, one heatmap, and lines to print."""

    run: Path
    metrics: dict
    heatmap: Path | None
    gallery: Path | None
    lines: list[str] = field(default_factory=list)
    pictures: list[Path] = field(default_factory=list)


def mil_for_demo(
    root: str | Path,
    labels: str | Path | Mapping[str, str | int],
    out: str | Path,
    *,
    encoder: str | None = None,
    config: MILConfig = DEMO_CONFIG,
    skip_missing: bool = False,
    progress: bool = False,
) -> MILDemoResult:
    """Cross-validate ABMIL on the demo archive and draw one attention heatmap.

    Args:
        root: archive root whose slides have embeddings (``wsi-ssl embed``).
        labels: labels CSV, or ``{slide id or file name: label}``.
        out: folder for the run (``out/run``) and predictions (``out/run/predictions``).
        encoder: encoder_id (None: the archive's only one).
        config: training settings; folds are lowered to what the labels allow (at least 2
            patients per class are needed).
        skip_missing: leave out (and name) labelled slides without a store or embeddings
            (slides that failed to tile).
        progress: print one line per epoch.

    Returns:
        A :class:`MILDemoResult`; ``heatmap`` is the slide predicted most confidently as the
        last class (the positive class of a binary task).

    Raises:
        LabelsError: fewer than 2 labelled slides (patients) in some class, or bad labels.
    """
    from wsi_ssl.mil.prediction import predict
    from wsi_ssl.mil.training import train

    table = LabelTable.from_mapping(labels) if isinstance(labels, Mapping) else read_labels(labels)
    report = match_labels(root, table, encoder, skip_missing=skip_missing)
    fewest = min(len({s.patient for s in report.slides if s.label == c}) for c in report.classes)
    if fewest < 2:
        raise LabelsError(
            table.path,
            "the MIL demo needs at least 2 labelled slides (patients) of every class; "
            f"got {report.class_counts}",
        )
    folds = min(config.folds, fewest)
    run_dir = Path(out) / "run"
    settings = dataclasses.replace(config, folds=folds)
    metrics = _trained_before(run_dir, report, settings)
    if metrics is not None:  # a re-run: the same run again would give the same numbers
        lines = [
            f"MIL run {run_dir} is up to date (same slides, labels, encoder and settings): "
            f"out-of-fold AUC {_fmt(metrics['overall']['auc'])}, balanced accuracy "
            f"{_fmt(metrics['overall']['balanced_accuracy'])}"
        ]
        classes, roc = list(metrics["classes"]), run_dir / "roc.png"
    else:
        result = train(
            root,
            table,
            report.encoder_id,
            run_dir,
            settings,
            overwrite=True,
            skip_missing=skip_missing,
            progress=progress,
        )
        metrics = {"overall": result.overall, "folds_mean_std": result.summary}
        lines, classes, roc = result.lines(), result.classes, result.roc_path
    preds = predict(run_dir, root, run_dir / "predictions")
    lines += preds.lines()
    heatmap = gallery = None
    if preds.slides:
        positive = classes[-1]
        best = max(preds.slides, key=lambda s: s.probabilities[positive])
        heatmap, gallery = best.heatmap, best.gallery
        lines.append(
            f"attention heatmap of {best.name} ({positive} {best.probabilities[positive]:.2f}): {heatmap}"
        )
    metrics = {"overall": metrics["overall"], "folds_mean_std": metrics["folds_mean_std"]}
    pictures = [p for p in (roc, heatmap, gallery) if p is not None]
    return MILDemoResult(run_dir, metrics, heatmap, gallery, lines, pictures)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _trained_before(run: Path, report: MatchReport, config: MILConfig) -> dict | None:
    """``run``'s metrics when it was trained on these slides and labels, with this encoder and
    these settings (None: it was not, or it is not complete)."""
    try:
        info = json.loads((run / "run.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        with (run / "splits.csv").open(newline="") as f:
            labelled = {(r["slide_id"], r["label"]) for r in csv.DictReader(f)}
    except (OSError, ValueError, KeyError):
        return None
    same = (
        info.get("config") == config.to_dict()
        and info.get("encoder_id") == report.encoder_id
        and labelled == {(s.slide_id, s.label) for s in report.slides}
        and (run / "roc.png").is_file()
    )
    return metrics if same else None
