"""Cross-validated MIL training: ``wsi_ssl.mil.train`` and ``wsi-ssl mil train``.

Per fold ``f`` of a patient-grouped, stratified k-fold split (or the CSV's ``fold`` column):
the slides of fold ``f`` are the test set; a patient-disjoint, stratified validation split is
carved out of the other folds for early stopping; the model is trained one bag per step with
AdamW and class weighting (or weighted sampling), the epoch with the best validation metric is
kept, and the test slides are scored with it. Metrics are reported per fold and pooled over
the out-of-fold predictions, as in CLAM (Lu et al. 2021) and most MIL benchmarks.

Run layout (written under a temporary name and renamed into place when complete)::

    RUN/run.json           config, encoder_id, classes, seeds, folds, label report, versions,
                           training slides and their tilings
    RUN/metrics.json       per fold (test and validation) and overall metrics
    RUN/roc.png            ROC curves per fold and pooled
    RUN/splits.csv         slide, patient, label, fold
    RUN/predictions.csv    out-of-fold class probabilities of every labelled slide
    RUN/folds/fold_<f>/model.pt      checkpoint: state dict + MILConfig + encoder_id + classes
                                     (its sha256 in run.json, checked when the run predicts)
    RUN/folds/fold_<f>/history.csv   per epoch: train loss, validation loss and metric
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_ssl.errors import ConfigError, DiskFullError
from wsi_ssl.interrupts import interrupts_held
from wsi_ssl.mil.config import MILConfig
from wsi_ssl.mil.cv import fold_splits, folds_from_table
from wsi_ssl.mil.data import BagCache, BagDataset, BagRef
from wsi_ssl.mil.fitting import METRIC_KEYS, torch_threads
from wsi_ssl.mil.labels import LabelTable, read_labels
from wsi_ssl.mil.learners import CVContext, FoldSplit, get_learner
from wsi_ssl.mil.matching import MatchReport, check_one_scale, check_one_stain, match_labels
from wsi_ssl.mil.metrics import classification_metrics
from wsi_ssl.mil.rundir import (
    CHECKPOINT_FORMAT,
    RUN_FORMAT,
    checkpoint_digests,
    checkpoint_header,
    partial_dir,
    publish,
    replaced_run_note,
    run_info,
    write_fold,
    write_json,
    write_predictions,
)
from wsi_ssl.storage.atomic import is_no_space, restore_directory
from wsi_ssl.storage.locks import hold_lock, run_lock_path

__all__ = ["CHECKPOINT_FORMAT", "RUN_FORMAT", "FoldResult", "TrainResult", "torch_threads", "train"]


@dataclass
class FoldResult:
    """One fold: its split sizes, the epoch kept (numbered from 1, as in ``history.csv``;
    None without early stopping), and test and validation metrics."""

    fold: int
    seed: int
    n_train: int
    n_val: int
    n_test: int
    best_epoch: int | None
    epochs_run: int
    early_stopping: bool
    test: dict[str, Any]
    val: dict[str, Any] | None = None
    note: str | None = None
    seconds: float = 0.0
    bags_per_s: float = 0.0
    checkpoint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What :func:`train` wrote and measured."""

    run: Path
    config: MILConfig
    encoder_id: str
    classes: list[str]
    report: MatchReport
    folds: list[FoldResult]
    overall: dict[str, Any]
    summary: dict[str, dict[str, float | None]]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def metrics_path(self) -> Path:
        return self.run / "metrics.json"

    @property
    def roc_path(self) -> Path:
        return self.run / "roc.png"

    def lines(self) -> list[str]:
        """The report printed by ``wsi-ssl mil train``."""

        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        out = list(self.report.lines())
        learner = get_learner(self.config.model)
        for f in self.folds:
            stop = learner.stop_text(f.best_epoch, f.epochs_run, self.config)
            out.append(
                f"fold {f.fold}: {f.n_train} train / {f.n_val} val / {f.n_test} test slides, "
                f"{stop}: AUC {fmt(f.test['auc'])}  balanced accuracy "
                f"{fmt(f.test['balanced_accuracy'])}  F1 {fmt(f.test['f1'])}"
            )
        s = self.summary
        out.append(
            f"overall ({self.config.model}, out-of-fold, {self.overall['n']} slides): "
            f"AUC {fmt(self.overall['auc'])} (folds {fmt(s['auc']['mean'])} ± "
            f"{fmt(s['auc']['std'])})  balanced accuracy {fmt(self.overall['balanced_accuracy'])}"
            f"  F1 {fmt(self.overall['f1'])}"
        )
        width = max(len(c) for c in self.classes)
        out.append(
            "confusion matrix (rows: true, columns: predicted " + " ".join(self.classes) + ")"
        )
        for cls, row in zip(self.classes, self.overall["confusion_matrix"], strict=True):
            out.append(f"  {cls:>{width}}  " + " ".join(f"{v:>5}" for v in row))
        out.extend(self.notes)
        from wsi_ssl.mil.run import run_id_of

        out.append(
            f"wrote {self.run} (run id {run_id_of(self.run)}; metrics.json, roc.png, "
            f"{len(self.folds)} checkpoints)"
        )
        return out


def _summary(folds: list[FoldResult]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for key in METRIC_KEYS:
        values = [f.test[key] for f in folds if f.test.get(key) is not None]
        out[key] = {
            "mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values)) if values else None,
            "n_folds": len(values),
        }
    return out


# -- the entry point ---------------------------------------------------------------------------


def train(
    root: str | Path,
    labels: str | Path | LabelTable | Mapping[str, str | int],
    encoder: str | None,
    out: str | Path,
    config: MILConfig | None = None,
    *,
    skip_missing: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> TrainResult:
    """Cross-validate a MIL model on the labelled slides of an archive and save the run.

    Args:
        root: archive root whose slide stores hold ``embeddings/<encoder_id>``.
        labels: labels CSV (``slide``, ``label``, optional ``patient``, ``fold``), a
            :class:`~wsi_ssl.mil.labels.LabelTable` or ``{slide: label}``.
        encoder: ``encoder_id`` (or a unique prefix) of the embeddings; None: the one encoder
            every labelled slide has.
        out: run directory to write.
        config: settings; ``options`` (e.g. ``model="transmil", folds=3``) replace fields.
        skip_missing: leave out labelled slides without a store, readable embeddings (each
            bag is decoded once up front) or tiles (they are listed in the report, damaged
            embeddings with what is wrong) instead of raising.
        overwrite: replace an existing run at ``out``.
        progress: print one line per epoch (to ``log`` or stdout), and with ``skip_missing``
            one after the bags were checked: how many, how long, how many damaged.
        log: where progress lines go.

    Returns:
        A :class:`TrainResult`; ``result.lines()`` is the report.

    Raises:
        LabelsError: bad labels CSV, unknown slides, one class, fewer patients than folds.
        EmbeddingsNotFoundError: no embeddings of ``encoder``.
        EmptyBagError: a labelled slide has no tiles (unless ``skip_missing``).
        EmbeddingsCorruptError: a bag fails to decode when read (unless ``skip_missing``).
        ConfigError: bad settings, or ``out`` holds a run and ``overwrite`` is False.
        TrainingDivergedError: a non-finite loss.
        DiskFullError: the disk filled up while writing the run (nothing was left of it).
    """
    config = dataclasses.replace(config or MILConfig(), **options)
    out = Path(out)
    # one writer per run directory; an old run left aside by a killed swap is put back first
    with torch_threads(config.threads), hold_lock(run_lock_path(out), out, remove=True):
        restore_directory(out)
        return _train(root, labels, encoder, out, config, skip_missing, overwrite, progress, log)


def _train(
    root: str | Path,
    labels: str | Path | LabelTable | Mapping[str, str | int],
    encoder: str | None,
    out: str | Path,
    config: MILConfig,
    skip_missing: bool,
    overwrite: bool,
    progress: bool,
    log: Callable[[str], None] | None,
) -> TrainResult:
    from wsi_ssl.device import resolve_device

    started = time.perf_counter()
    out = Path(out)
    if out.resolve() == Path(root).resolve() or out.resolve() in Path(root).resolve().parents:
        raise ConfigError(
            f"{out}: holds the archive {root}; choose another out for the run",
            parameters=("out",),
        )
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"{out}: already exists and is not empty; pass overwrite=True or another out",
                parameters=("overwrite", "out"),
            )
        if not (out / "run.json").is_file():  # overwrite replaces a run, nothing else
            raise ConfigError(
                f"{out}: is not a MIL run (no run.json), so overwrite would delete what it "
                "holds; choose another out",
                parameters=("out",),
            )
    device = resolve_device(config.device)
    if progress and log is None:
        log = print
    table = labels if isinstance(labels, LabelTable | Mapping) else read_labels(labels)
    report = match_labels(
        root,
        table,
        encoder,
        skip_missing=skip_missing,
        skip_flagged_tiles=config.skip_flagged_tiles,
    )
    if log is not None and report.checked is not None:
        n, seconds = report.checked
        log(
            f"checked {n} bags for damaged embeddings in {seconds:.1f} s: "
            f"{len(report.damaged)} damaged"
        )
    folds, fold_source = folds_from_table(report, config, config.seed)
    check_one_stain(report)
    check_one_scale(report)
    get_learner(config.model).check_folds(folds, config)  # before any fold is fitted
    splits = list(fold_splits(report, folds, config))  # each fold's classes checked, too

    replaced = replaced_run_note(out) if overwrite else None
    partial = partial_dir(out)
    try:
        result = _cross_validate(
            root, out, partial, config, report, folds, splits, fold_source, device, log, started
        )
    except BaseException as err:
        with interrupts_held():  # nothing half-written is left behind, Ctrl-C twice or not
            shutil.rmtree(partial, ignore_errors=True)
        if is_no_space(err):
            raise DiskFullError(out) from err
        raise
    if replaced is not None:
        result.notes.append(replaced)
    return result


def _fold(split: FoldSplit, context: CVContext, partial: Path) -> tuple[FoldResult, np.ndarray]:
    """Fit one fold with the config's learner, write its checkpoint; returns the fold's
    result and its test slides' probabilities."""
    started = time.perf_counter()
    config, report = context.config, context.report
    fitted = get_learner(config.model).fit_fold(split, context)
    header = checkpoint_header(config, report, split.fold, split.seed)
    checkpoint = write_fold(partial, split.fold, header | fitted.checkpoint, fitted.history)
    seconds = time.perf_counter() - started
    result = FoldResult(
        fold=split.fold,
        seed=split.seed,
        n_train=fitted.n_train,
        n_val=fitted.n_val,
        n_test=len(split.test),
        best_epoch=fitted.best_epoch,
        epochs_run=fitted.epochs_run,
        early_stopping=fitted.best_val is not None,
        test=classification_metrics(context.y[split.test], fitted.probabilities, context.classes),
        val=fitted.best_val,
        note=fitted.note,
        seconds=round(seconds, 3),
        bags_per_s=round(fitted.seen / seconds, 2) if seconds else 0.0,
        checkpoint=checkpoint,
    )
    return result, fitted.probabilities


def _cross_validate(
    root: str | Path,
    out: Path,
    partial: Path,
    config: MILConfig,
    report: MatchReport,
    folds: np.ndarray,
    splits: list[FoldSplit],
    fold_source: str,
    device: torch.device,
    log: Callable[[str], None] | None,
    started: float,
) -> TrainResult:
    """Every fold (``folds``: each slide's test fold; ``splits``: every fold's rows), then the
    run's predictions, metrics and record; publishes the run."""
    classes, slides = report.classes, report.slides
    cache = BagCache(config.cache_mb << 20) if config.workers == 0 and config.cache_mb else None
    refs = [BagRef(s.slide_id, s.store_path, s.y) for s in slides]
    y = np.array([s.y for s in slides], dtype=np.int64)
    bags = BagDataset(refs, report.encoder_id, cache=cache, skip_flagged=config.skip_flagged_tiles)
    context = CVContext(config, report, refs, y, bags, cache, device, log)
    n_threads = torch.get_num_threads()
    oof = np.full((len(slides), len(classes)), np.nan)
    results: list[FoldResult] = []
    for split in splits:
        result, probs = _fold(split, context, partial)
        oof[split.test] = probs
        results.append(result)
    notes = [f"fold {r.fold}: {r.note}" for r in results if r.note]
    if fold_source == "csv" and len(results) != config.folds:
        notes.insert(
            0,
            f"the labels CSV's 'fold' column gives {len(results)} folds; folds={config.folds} "
            "is not used (drop the column to split anew)",
        )
    overall = classification_metrics(y, oof, classes)
    summary = _summary(results)
    title = f"{config.model} on {report.encoder_id}"
    write_predictions(partial, report, folds, oof, title, [r.fold for r in results])
    shared = {"n_folds": len(results), "fold_source": fold_source}
    metrics = {
        "model": config.model,
        "encoder_id": report.encoder_id,
        "classes": classes,
        "positive_class": classes[1] if len(classes) == 2 else None,
        "n_slides": len(slides),
        "n_patients": report.n_patients,
        **shared,
        "overall": overall,
        "folds_mean_std": summary,
        "folds": [r.to_dict() for r in results],
    }
    write_json(partial / "metrics.json", metrics)
    info = run_info(root, config, report, device, n_threads) | shared
    info |= {
        "seeds": {"split": config.seed, "folds": [r.seed for r in results]},
        "checkpoints": [r.checkpoint for r in results],
        "checkpoint_sha256": checkpoint_digests(partial, [r.checkpoint for r in results]),
        "report": report.to_dict(),
        "notes": notes,
        "training_slides": {s.slide_id: int(f) for s, f in zip(slides, folds, strict=True)},
    }
    write_json(partial / "run.json", info)
    publish(partial, out)
    return TrainResult(
        run=out,
        config=config,
        encoder_id=report.encoder_id,
        classes=classes,
        report=report,
        folds=results,
        overall=overall,
        summary=summary,
        seconds=time.perf_counter() - started,
        notes=notes,
    )
