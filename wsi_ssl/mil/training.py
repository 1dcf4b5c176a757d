"""Cross-validated MIL training: ``wsi_ssl.mil.train`` and ``wsi-ssl mil train``.

Per fold ``f`` of a patient-grouped, stratified k-fold split (or the CSV's ``fold`` column):
the slides of fold ``f`` are the test set; a patient-disjoint, stratified validation split is
carved out of the other folds for early stopping; the model is trained one bag per step with
AdamW and class weighting (or weighted sampling), the epoch with the best validation metric is
kept, and the test slides are scored with it. Metrics are reported per fold and pooled over
the out-of-fold predictions, as in CLAM (Lu et al. 2021) and most MIL benchmarks.

Run layout (written under a temporary name and renamed into place when complete)::

    RUN/run.json           config, encoder_id, classes, seeds, folds, label report, versions
    RUN/metrics.json       per fold (test and validation) and overall metrics
    RUN/roc.png            ROC curves per fold and pooled
    RUN/splits.csv         slide, patient, label, fold
    RUN/predictions.csv    out-of-fold class probabilities of every labelled slide
    RUN/folds/fold_<f>/model.pt      checkpoint: state dict + MILConfig + encoder_id + classes
    RUN/folds/fold_<f>/history.csv   per epoch: train loss, validation loss and metric
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_ssl.errors import ConfigError, LabelsError, TrainingDivergedError
from wsi_ssl.mil.config import MILConfig
from wsi_ssl.mil.data import BagCache, BagDataset, BagRef, EpochOrder
from wsi_ssl.mil.labels import LabelTable, MatchReport, match_labels, read_labels
from wsi_ssl.mil.metrics import classification_metrics, plot_roc
from wsi_ssl.mil.models import MILModel, Standardized, create_model, feature_stats
from wsi_ssl.mil.retrieval import RetrievalClassifier, slide_vector
from wsi_ssl.mil.splits import assign_folds

__all__ = ["CHECKPOINT_FORMAT", "FoldResult", "TrainResult", "torch_threads", "train"]

CHECKPOINT_FORMAT = "wsi-ssl-mil"
RUN_FORMAT = "wsi-ssl-mil-run"
FORMAT_VERSION = 1
METRIC_KEYS = ("auc", "balanced_accuracy", "f1", "accuracy")
STATS_BAGS = 256  # training bags the standardisation statistics are computed from


@dataclass
class FoldResult:
    """One fold: its split sizes, the epoch kept, and test and validation metrics."""

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
        for f in self.folds:
            if self.config.model == "retrieval":
                stop = f"{self.config.k}-NN vote"
            elif f.best_epoch is not None:
                stop = f"best epoch {f.best_epoch + 1} of {f.epochs_run}"
            else:
                stop = f"{f.epochs_run} epochs"
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
        out.append(f"wrote {self.run} (metrics.json, roc.png, {len(self.folds)} checkpoints)")
        return out


# -- helpers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (None: leave as is), restored afterwards."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _folds_from_table(report: MatchReport, config: MILConfig, seed: int) -> tuple[np.ndarray, str]:
    """The test fold of every slide: the CSV's ``fold`` column or a generated split."""
    slides = report.slides
    if any(s.fold is not None for s in slides):
        values = sorted({s.fold for s in slides if s.fold is not None})
        if len(values) < 2:
            raise LabelsError(report.labels_path, "the slides left have a single 'fold' value")
        # read_labels gives every slide a fold once the column is there: no fold is None here
        index: dict[int | None, int] = {v: i for i, v in enumerate(values)}
        return np.array([index[s.fold] for s in slides], dtype=np.int64), "csv"
    y = [s.y for s in slides]
    groups = [s.patient for s in slides]
    counts = {c: len({s.patient for s in slides if s.y == i}) for i, c in enumerate(report.classes)}
    rare, n_rare = min(counts.items(), key=lambda kv: kv[1])
    if n_rare < config.folds:
        raise LabelsError(
            report.labels_path,
            f"class {rare!r} has {n_rare} patient(s), fewer than --folds {config.folds}; "
            f"use --folds {max(2, n_rare)} or fewer"
            + (" or label more slides" if n_rare < 2 else ""),
            [s.line for s in slides if s.label == rare],
        )
    return assign_folds(y, groups, config.folds, seed), "generated"


def _inner_split(
    y: np.ndarray, groups: list[str], classes: list[str], val_fraction: float, seed: int
) -> tuple[np.ndarray | None, str | None]:
    """A validation mask over the training slides, or None and why there is none."""
    if val_fraction == 0:
        return None, "val_fraction is 0: trained every epoch, no early stopping"
    per_class = [
        len({g for g, v in zip(groups, y, strict=True) if v == c}) for c in range(len(classes))
    ]
    low = [classes[c] for c, n in enumerate(per_class) if n < 2]
    if low:
        return None, (
            f"fewer than 2 training patients of class {', '.join(map(repr, low))}: no "
            "validation split, trained every epoch without early stopping"
        )
    parts = assign_folds(y.tolist(), groups, max(2, round(1 / val_fraction)), seed)
    return parts == 0, None


def _score(metrics: dict[str, Any], loss: float, monitor: str) -> tuple[float, ...]:
    """Bigger is better; ties broken by the lower loss."""
    if monitor == "loss":
        return (-loss,)
    value = metrics.get(monitor)
    return (-math.inf if value is None else float(value), -loss)


@torch.no_grad()
def _evaluate(
    model: MILModel, data: BagDataset, device: torch.device, loss_fn: nn.Module
) -> tuple[np.ndarray, float]:
    model.eval()
    probs, losses = [], []
    for i in range(len(data)):
        x, y, _ = data[i]
        logits, _ = model(x.to(device))
        losses.append(float(loss_fn(logits[None].float(), torch.tensor([y], device=device))))
        probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    return np.stack(probs), float(np.mean(losses))


def _class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return len(y) / (n_classes * np.maximum(counts, 1))


def _loader(data: BagDataset, sampler: EpochOrder, workers: int) -> Any:
    """Bags in the sampler's order: read in the main process, or by persistent workers."""
    if workers == 0:
        return None
    return torch.utils.data.DataLoader(
        data,
        batch_size=None,
        sampler=sampler,
        num_workers=workers,
        prefetch_factor=4,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(0),  # leaves the global RNG (dropout) alone
    )


def _fit(
    model: MILModel,
    train_data: BagDataset,
    val_data: BagDataset | None,
    config: MILConfig,
    device: torch.device,
    rng: np.random.Generator,
    classes: list[str],
    log: Callable[[str], None] | None,
    fold: int,
) -> tuple[list[dict[str, Any]], int | None, dict[str, Any] | None, int]:
    """Train with early stopping; loads the best state into ``model``.

    Returns (history, best epoch or None, best validation metrics, bags seen).
    """
    n_classes = len(classes)
    y = np.array([r.y for r in train_data.refs])
    weights = _class_weights(y, n_classes)
    loss_weight = (
        torch.tensor(weights, dtype=torch.float32, device=device)
        if config.balance == "weights"
        else None
    )
    loss_fn = nn.CrossEntropyLoss(weight=loss_weight)
    sample_p = weights[y] / weights[y].sum()
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    history: list[dict[str, Any]] = []
    best: tuple[float, ...] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int | None = None
    best_val: dict[str, Any] | None = None
    stale = 0
    seen = 0
    sampler = EpochOrder()
    loader = _loader(train_data, sampler, config.workers)
    for epoch in range(config.epochs):
        train_data.set_epoch(epoch)
        n = len(train_data)
        order = (
            rng.choice(n, n, replace=True, p=sample_p)
            if config.balance == "sampler"
            else rng.permutation(n)
        )
        sampler.set(order, epoch)
        model.train()
        total = 0.0
        batches = loader if loader is not None else (train_data[k] for k in sampler)
        for x, label, index in batches:
            logits, _ = model(x.to(device, non_blocking=True))
            loss = loss_fn(logits[None].float(), torch.tensor([int(label)], device=device))
            if not torch.isfinite(loss):
                ref = train_data.refs[int(index)]
                raise TrainingDivergedError(
                    f"fold {fold}, epoch {epoch + 1}: non-finite loss on slide {ref.slide_id}; "
                    "lower --lr or check the embeddings for NaN/inf"
                )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item()
        seen += n
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / max(1, n)}
        if val_data is not None:
            probs, val_loss = _evaluate(model, val_data, device, loss_fn)
            metrics = classification_metrics([r.y for r in val_data.refs], probs, classes)
            score = _score(metrics, val_loss, config.monitor)
            row |= {"val_loss": val_loss} | {f"val_{k}": metrics[k] for k in METRIC_KEYS}
            if best is None or score > best:
                best, best_epoch, best_val, stale = score, epoch, metrics, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        history.append(row)
        if log is not None:
            log(
                f"fold {fold} epoch {epoch + 1}: train loss {row['train_loss']:.4f}"
                + (f", val loss {row['val_loss']:.4f}" if "val_loss" in row else "")
            )
        if val_data is not None and epoch + 1 >= config.min_epochs and stale >= config.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history, best_epoch, best_val, seen


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


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


def _encoder_attrs(report: MatchReport) -> dict[str, Any]:
    import zarr

    first = report.slides[0].store_path / "embeddings" / report.encoder_id
    attrs = dict(zarr.open_array(first, mode="r").attrs)
    return {"encoder": attrs.get("encoder", {}), "weights_sha256": attrs.get("weights_sha256")}


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
        skip_missing: leave out labelled slides without a store, embeddings or tiles (they
            are listed in the report) instead of raising.
        overwrite: replace an existing run at ``out``.
        progress: print one line per epoch (to ``log`` or stdout).
        log: where progress lines go.

    Returns:
        A :class:`TrainResult`; ``result.lines()`` is the report.

    Raises:
        LabelsError: bad labels CSV, unknown slides, one class, fewer patients than folds.
        EmbeddingsNotFoundError: no embeddings of ``encoder``.
        EmptyBagError: a labelled slide has no tiles (unless ``skip_missing``).
        ConfigError: bad settings, or ``out`` holds a run and ``overwrite`` is False.
        TrainingDivergedError: a non-finite loss.
    """
    config = dataclasses.replace(config or MILConfig(), **options)
    with torch_threads(config.threads):
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
    from wsi_ssl.encoders.encoder import resolve_device

    started = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"{out}: already exists and is not empty; pass --overwrite or another --out"
        )
    device = resolve_device(config.device)
    if progress and log is None:
        log = print
    table = labels if isinstance(labels, LabelTable | Mapping) else read_labels(labels)
    report = match_labels(root, table, encoder, skip_missing=skip_missing)
    folds, fold_source = _folds_from_table(report, config, config.seed)

    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "folds").mkdir(parents=True)
    try:
        return _cross_validate(
            root, out, partial, config, report, folds, fold_source, device, log, started
        )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written is left behind
        raise


def _cross_validate(
    root: str | Path,
    out: Path,
    partial: Path,
    config: MILConfig,
    report: MatchReport,
    folds: np.ndarray,
    fold_source: str,
    device: torch.device,
    log: Callable[[str], None] | None,
    started: float,
) -> TrainResult:
    from wsi_ssl import __version__

    classes, n_classes = report.classes, len(report.classes)
    slides = report.slides
    n_folds = int(folds.max()) + 1
    y_all = np.array([s.y for s in slides], dtype=np.int64)
    cache = BagCache(config.cache_mb << 20) if config.workers == 0 and config.cache_mb else None
    refs = [BagRef(s.slide_id, s.store_path, s.y) for s in slides]
    oof = np.full((len(slides), n_classes), np.nan)
    results: list[FoldResult] = []
    notes: list[str] = []
    n_threads = torch.get_num_threads()
    all_data = BagDataset(refs, report.encoder_id, cache=cache)
    vec: dict[int, np.ndarray] = {}  # slide vectors of the retrieval baseline
    for f in range(n_folds):
        fold_started = time.perf_counter()
        seed = config.seed + f
        test_idx = np.flatnonzero(folds == f)
        rest = np.flatnonzero(folds != f)
        val_mask, note = _inner_split(
            y_all[rest], [slides[i].patient for i in rest], classes, config.val_fraction, seed
        )
        if note and config.model != "retrieval":
            notes.append(f"fold {f}: {note}")
        val_idx = rest[val_mask] if val_mask is not None else np.zeros(0, np.int64)
        train_idx = rest[~val_mask] if val_mask is not None else rest
        if len(set(y_all[train_idx].tolist())) < 2:
            raise LabelsError(
                report.labels_path,
                f"fold {f}: the training slides hold a single class; use fewer folds",
            )
        fold_dir = partial / "folds" / f"fold_{f}"
        fold_dir.mkdir()
        common = {
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "encoder_id": report.encoder_id,
            "in_dim": report.in_dim,
            "classes": classes,
            "fold": f,
            "seed": seed,
        }
        history: list[dict[str, Any]] = []
        best_val = None
        if config.model == "retrieval":
            fit_idx = rest
            for i in (*fit_idx, *test_idx):
                if int(i) not in vec:
                    vec[int(i)] = slide_vector(all_data.raw(int(i)))
            clf = RetrievalClassifier(n_classes, config.k).fit(
                np.stack([vec[int(i)] for i in fit_idx]),
                y_all[fit_idx],
                [slides[i].slide_id for i in fit_idx],
            )
            test_probs = clf.predict_proba(np.stack([vec[int(i)] for i in test_idx]))
            best_epoch, epochs_run, seen = None, 0, len(fit_idx)
            torch.save(
                common | {"kind": "retrieval", "best_epoch": None, "retrieval": clf.state()},
                fold_dir / "model.pt",
            )
            train_idx, val_idx = fit_idx, np.zeros(0, np.int64)
        else:
            torch.manual_seed(seed)
            rng = np.random.default_rng([config.seed, f])
            model: MILModel = create_model(config.model, report.in_dim, n_classes, config)
            train_data = BagDataset(
                [refs[i] for i in train_idx],
                report.encoder_id,
                max_tiles=config.max_tiles,
                seed=seed,
                cache=cache,
            )
            if config.standardize:  # from up to STATS_BAGS training bags, evenly spread
                picks = np.unique(np.linspace(0, len(train_data) - 1, STATS_BAGS).astype(int))
                stats = feature_stats(train_data.raw(int(i)) for i in picks)
                model = Standardized(model, *stats)
            model = model.to(device)
            val_data = (
                BagDataset([refs[i] for i in val_idx], report.encoder_id, cache=cache)
                if len(val_idx)
                else None
            )
            history, best_epoch, best_val, seen = _fit(
                model, train_data, val_data, config, device, rng, classes, log, f
            )
            epochs_run = len(history)
            test_data = BagDataset([refs[i] for i in test_idx], report.encoder_id, cache=cache)
            test_probs, _ = _evaluate(model, test_data, device, nn.CrossEntropyLoss())
            torch.save(
                common
                | {
                    "kind": "torch",
                    "model": config.model,
                    "best_epoch": best_epoch,
                    "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                },
                fold_dir / "model.pt",
            )
            if history:
                keys = list(dict.fromkeys(k for row in history for k in row))
                _write_csv(
                    fold_dir / "history.csv", keys, [[row.get(k) for k in keys] for row in history]
                )
        oof[test_idx] = test_probs
        seconds = time.perf_counter() - fold_started
        val_metrics = best_val
        results.append(
            FoldResult(
                fold=f,
                seed=seed,
                n_train=len(train_idx),
                n_val=len(val_idx),
                n_test=len(test_idx),
                best_epoch=best_epoch,
                epochs_run=epochs_run,
                early_stopping=val_metrics is not None,
                test=classification_metrics(y_all[test_idx], test_probs, classes),
                val=val_metrics,
                note=note if config.model != "retrieval" else None,
                seconds=round(seconds, 3),
                bags_per_s=round(seen / seconds, 2) if seconds else 0.0,
                checkpoint=f"folds/fold_{f}/model.pt",
            )
        )

    overall = classification_metrics(y_all, oof, classes)
    summary = _summary(results)
    _write_csv(
        partial / "splits.csv",
        ["slide_id", "name", "patient", "label", "fold", "line"],
        [
            [s.slide_id, s.name, s.patient, s.label, int(folds[i]), s.line]
            for i, s in enumerate(slides)
        ],
    )
    _write_csv(
        partial / "predictions.csv",
        [
            "slide_id",
            "name",
            "patient",
            "label",
            "fold",
            "predicted",
            *[f"prob_{c}" for c in classes],
        ],
        [
            [s.slide_id, s.name, s.patient, s.label, int(folds[i]), classes[int(oof[i].argmax())]]
            + [f"{p:.6f}" for p in oof[i]]
            for i, s in enumerate(slides)
        ],
    )
    curves = [(f"fold {r.fold}", y_all[folds == r.fold], oof[folds == r.fold]) for r in results] + [
        ("pooled", y_all, oof)
    ]
    plot_roc(partial / "roc.png", curves, classes, f"{config.model} on {report.encoder_id}")
    metrics = {
        "model": config.model,
        "encoder_id": report.encoder_id,
        "classes": classes,
        "positive_class": classes[1] if n_classes == 2 else None,
        "n_slides": len(slides),
        "n_patients": report.n_patients,
        "n_folds": n_folds,
        "fold_source": fold_source,
        "overall": overall,
        "folds_mean_std": summary,
        "folds": [r.to_dict() for r in results],
    }
    (partial / "metrics.json").write_text(json.dumps(metrics, indent=2))
    run_info = {
        "format": RUN_FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wsi_ssl_version": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "torch_threads": n_threads,
        "config": config.to_dict(),
        "encoder_id": report.encoder_id,
        **_encoder_attrs(report),
        "in_dim": report.in_dim,
        "classes": classes,
        "root": str(Path(root).resolve()),
        "labels": report.labels_path,
        "n_folds": n_folds,
        "fold_source": fold_source,
        "seeds": {"split": config.seed, "folds": [r.seed for r in results]},
        "checkpoints": [r.checkpoint for r in results],
        "report": report.to_dict(),
        "notes": notes,
    }
    (partial / "run.json").write_text(json.dumps(run_info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, out)
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
