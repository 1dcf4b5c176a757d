"""The MIL step of ``wsi-ssl demo``: a small cross-validated ABMIL run and one heatmap."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wsi_ssl.errors import LabelsError
from wsi_ssl.mil.config import MILConfig
from wsi_ssl.mil.labels import LabelTable, read_labels
from wsi_ssl.mil.matching import match_labels

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
    report = match_labels(root, table, encoder)
    fewest = min(len({s.patient for s in report.slides if s.label == c}) for c in report.classes)
    if fewest < 2:
        raise LabelsError(
            table.path,
            "the MIL demo needs at least 2 labelled slides (patients) of every class; "
            f"got {report.class_counts}",
        )
    folds = min(config.folds, fewest)
    run_dir = Path(out) / "run"
    result = train(
        root,
        table,
        report.encoder_id,
        run_dir,
        config,
        overwrite=True,
        progress=progress,
        folds=folds,
    )
    preds = predict(run_dir, root, run_dir / "predictions")
    lines = [*result.lines(), *preds.lines()]
    heatmap = gallery = None
    if preds.slides:
        positive = result.classes[-1]
        best = max(preds.slides, key=lambda s: s.probabilities[positive])
        heatmap, gallery = best.heatmap, best.gallery
        lines.append(
            f"attention heatmap of {best.name} ({positive} {best.probabilities[positive]:.2f}): {heatmap}"
        )
    metrics = {"overall": result.overall, "folds_mean_std": result.summary}
    pictures = [p for p in (result.roc_path, heatmap, gallery) if p is not None]
    return MILDemoResult(run_dir, metrics, heatmap, gallery, lines, pictures)
