"""Fitting a MIL model on one fold: :class:`TorchLearner` (the learner of every model in
:mod:`wsi_ssl.mil.models`).

The model is trained one bag per step with AdamW and class weighting (or weighted sampling);
the epoch with the best validation metric is kept (early stopping on a patient-disjoint
validation split), and the test slides are scored with it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_ssl.errors import CheckpointError, TrainingDivergedError
from wsi_ssl.mil.config import MILConfig
from wsi_ssl.mil.data import BagDataset, EpochOrder
from wsi_ssl.mil.learners import CVContext, FoldFit, FoldSplit
from wsi_ssl.mil.metrics import classification_metrics
from wsi_ssl.mil.models import MILModel, Standardized, as_bag, create_model, feature_stats

__all__ = ["METRIC_KEYS", "TorchLearner", "TorchPredictor", "evaluate", "torch_threads"]

METRIC_KEYS = ("auc", "balanced_accuracy", "f1", "accuracy")
STATS_BAGS = 256  # training bags the standardisation statistics are computed from


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


def _score(metrics: dict[str, Any], loss: float, monitor: str) -> tuple[float, ...]:
    """Bigger is better; ties broken by the lower loss."""
    if monitor == "loss":
        return (-loss,)
    value = metrics.get(monitor)
    return (-math.inf if value is None else float(value), -loss)


@torch.no_grad()
def evaluate(
    model: MILModel, data: BagDataset, device: torch.device, loss_fn: nn.Module
) -> tuple[np.ndarray, float]:
    """Class probabilities (n, C) of every bag of ``data`` and the mean loss."""
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


class _Trainer:
    """One fold's training loop: loss, optimiser, epoch order, early stopping."""

    def __init__(
        self,
        model: MILModel,
        train_data: BagDataset,
        config: MILConfig,
        device: torch.device,
        classes: list[str],
    ) -> None:
        self.model, self.data, self.config, self.device = (model, train_data, config, device)
        self.classes = classes
        self.y = np.array([r.y for r in train_data.refs])
        weights = _class_weights(self.y, len(classes))
        loss_weight = (
            torch.tensor(weights, dtype=torch.float32, device=device)
            if config.balance == "weights"
            else None
        )
        self.loss_fn = nn.CrossEntropyLoss(weight=loss_weight)
        self.sample_p = weights[self.y] / weights[self.y].sum()
        self.optimiser = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.sampler = EpochOrder()
        self.loader = _loader(train_data, self.sampler, config.workers)

    def epoch(self, epoch: int, rng: np.random.Generator, fold: int) -> float:
        """Train one epoch; returns the mean training loss."""
        data, config, device = self.data, self.config, self.device
        data.set_epoch(epoch)
        n = len(data)
        order = (
            rng.choice(n, n, replace=True, p=self.sample_p)
            if config.balance == "sampler"
            else rng.permutation(n)
        )
        self.sampler.set(order, epoch)
        self.model.train()
        total = 0.0
        batches = self.loader if self.loader is not None else (data[k] for k in self.sampler)
        for x, label, index in batches:
            logits, _ = self.model(x.to(device, non_blocking=True))
            loss = self.loss_fn(logits[None].float(), torch.tensor([int(label)], device=device))
            if not torch.isfinite(loss):
                ref = data.refs[int(index)]
                raise TrainingDivergedError(
                    f"fold {fold}, epoch {epoch + 1}: non-finite loss on slide {ref.slide_id}; "
                    "lower lr or check the embeddings for NaN/inf"
                )
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            self.optimiser.step()
            total += loss.item()
        return total / max(1, n)


def fit(
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

    Returns (history, best epoch or None, best validation metrics, bags seen); epochs are
    numbered from 1, as in the history.
    """
    trainer = _Trainer(model, train_data, config, device, classes)
    history: list[dict[str, Any]] = []
    best: tuple[float, ...] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int | None = None
    best_val: dict[str, Any] | None = None
    stale = seen = 0
    for epoch in range(config.epochs):
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": trainer.epoch(epoch, rng, fold)}
        seen += len(train_data)
        if val_data is not None:
            probs, val_loss = evaluate(model, val_data, device, trainer.loss_fn)
            metrics = classification_metrics([r.y for r in val_data.refs], probs, classes)
            score = _score(metrics, val_loss, config.monitor)
            row |= {"val_loss": val_loss} | {f"val_{k}": metrics[k] for k in METRIC_KEYS}
            if best is None or score > best:
                best, best_epoch, best_val, stale = score, epoch + 1, metrics, 0
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


class TorchPredictor:
    """A fitted :class:`MILModel` as a :class:`~wsi_ssl.mil.learners.Predictor`."""

    def __init__(self, model: MILModel, device: torch.device) -> None:
        self.model = model
        self.device = device

    def predict(
        self, bag: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None, list[tuple[str, float]]]:
        probs, attention = self.model.predict(as_bag(bag, self.device))
        return probs, attention, []


class TorchLearner:
    """Trains MIL model ``name`` (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _new_model(self, train_data: BagDataset, context: CVContext) -> MILModel:
        config = context.config
        model = create_model(self.name, context.report.in_dim, len(context.classes), config)
        if config.standardize:  # from up to STATS_BAGS training bags, evenly spread
            picks = np.unique(np.linspace(0, len(train_data) - 1, STATS_BAGS).astype(int))
            stats = feature_stats(train_data.raw(int(i)) for i in picks)
            model = Standardized(model, *stats)
        return model.to(context.device)

    def fit_fold(self, split: FoldSplit, context: CVContext) -> FoldFit:
        config, refs, eid, cache = (
            context.config,
            context.refs,
            context.report.encoder_id,
            context.cache,
        )
        torch.manual_seed(split.seed)
        rng = np.random.default_rng([config.seed, split.fold])
        train_data = BagDataset(
            [refs[i] for i in split.train],
            eid,
            max_tiles=config.max_tiles,
            seed=split.seed,
            cache=cache,
            skip_flagged=config.skip_flagged_tiles,
        )
        model = self._new_model(train_data, context)
        skip = config.skip_flagged_tiles
        val_data = (
            BagDataset([refs[i] for i in split.val], eid, cache=cache, skip_flagged=skip)
            if len(split.val)
            else None
        )
        history, best_epoch, best_val, seen = fit(
            model,
            train_data,
            val_data,
            config,
            context.device,
            rng,
            context.classes,
            context.log,
            split.fold,
        )
        test_data = BagDataset([refs[i] for i in split.test], eid, cache=cache, skip_flagged=skip)
        probs, _ = evaluate(model, test_data, context.device, nn.CrossEntropyLoss())
        checkpoint = {
            "kind": "torch",
            "model": self.name,
            "best_epoch": best_epoch,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        }
        return FoldFit(
            probs,
            checkpoint,
            n_train=len(split.train),
            n_val=len(split.val),
            seen=seen,
            best_epoch=best_epoch,
            epochs_run=len(history),
            best_val=best_val,
            history=history,
            note=split.note,
        )

    def load(
        self, checkpoint: dict[str, Any], config: MILConfig, device: torch.device
    ) -> TorchPredictor:
        """The fold model of ``checkpoint``.

        Raises:
            CheckpointError: the weights do not fit the model.
        """
        model = create_model(
            checkpoint["model"], int(checkpoint["in_dim"]), len(checkpoint["classes"]), config
        )
        if config.standardize:
            model = Standardized(model)
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as err:
            raise CheckpointError(
                f"weights do not fit model {checkpoint['model']!r} ({err})"
            ) from err
        return TorchPredictor(model.to(device).eval(), device)

    def check_folds(self, folds: np.ndarray, config: MILConfig) -> None:
        """Nothing to add: :func:`wsi_ssl.mil.cv.fold_splits` checks what every fold needs."""

    def stop_text(self, best_epoch: int | None, epochs_run: int, config: MILConfig) -> str:
        if best_epoch is not None:
            return f"best epoch {best_epoch} of {epochs_run}"
        return f"{epochs_run} epochs"
