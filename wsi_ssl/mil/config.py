"""``MILConfig``: the frozen settings of a slide-level MIL run, recorded with its checkpoints."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from wsi_ssl.errors import ConfigError
from wsi_ssl.mil.learners import learner_names

__all__ = ["BALANCE_MODES", "BUILTIN_MODELS", "MONITORS", "MILConfig"]

BUILTIN_MODELS = ("abmil", "transmil", "meanpool", "retrieval")
BALANCE_MODES = ("weights", "sampler", "none")
MONITORS = ("auc", "balanced_accuracy", "f1", "loss")


@dataclass(frozen=True)
class MILConfig:
    """How a MIL model is built, trained and cross-validated.

    Defaults follow the attention-MIL literature on frozen tile embeddings: one bag per step,
    AdamW at 2e-4 (CLAM, Lu et al. 2021), gated attention (Ilse et al. 2018), early stopping on
    a patient-disjoint validation split carved out of each fold's training slides.

    Attributes:
        model: "abmil" (gated attention MIL, the default), "transmil", "meanpool" or
            "retrieval" (majority vote of the nearest labelled slides in a FAISS index), or a
            model registered with :func:`wsi_ssl.mil.register_model` (or a learner with
            :func:`wsi_ssl.mil.learners.register_learner`).
        hidden_dim: width of the tile projection (ABMIL, mean pooling) or the token width
            (TransMIL).
        attention_dim: width of the gated attention branches (ABMIL).
        dropout: dropout after the tile projection and before the classifier.
        standardize: standardise every embedding dimension with the mean and standard
            deviation of the fold's training tiles (kept in the checkpoint); embedding scales
            differ between encoders by orders of magnitude.
        n_heads: attention heads (TransMIL, which needs ``hidden_dim`` to be a multiple).
        n_layers: transformer layers (TransMIL).
        k: neighbours that vote (retrieval); fewer than every fold's training slides, or the
            vote would ignore similarity (refused).
        folds: cross-validation folds (ignored when the labels CSV has a ``fold`` column).
        val_fraction: share of each fold's training patients held out for early stopping;
            0 trains for ``epochs`` without early stopping. The held-out part holds every
            class, so with few patients of a class it grows (to 1/3 at most), else there is
            none (a note says so).
        epochs: the most epochs per fold.
        patience: epochs without improvement of ``monitor`` before stopping.
        min_epochs: epochs always trained before early stopping may end a fold.
        monitor: validation metric for early stopping and model selection ("auc",
            "balanced_accuracy", "f1" or "loss"); ties are broken by the lower loss.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        balance: class imbalance handling: "weights" (inverse-frequency class weights in the
            loss), "sampler" (bags drawn with probability inversely proportional to their class
            frequency) or "none".
        skip_flagged_tiles: leave the tiles the store's QC flagged (blur, pen, little tissue,
            dark; :func:`wsi_ssl.tiling.qc.kept_tiles` with the thresholds the slide was tiled
            with) out of every bag, in training and prediction; their attention is 0. A store
            tiled without QC keeps every tile.
        max_tiles: during training, bags larger than this are randomly subsampled to this
            many tiles, afresh every epoch (None: always the whole bag). Validation, test and
            prediction always use every tile.
        seed: seeds splits, initialisation, sampling and subsampling (fold ``f`` uses
            ``seed + f`` for its model).
        device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
        workers: DataLoader worker processes reading bags (0: in the main process).
        threads: torch CPU threads while training and predicting (None: torch's default);
            1 is often fastest for small bags on a busy machine.
        cache_mb: bags kept in memory (as stored, float16) after their first read, up to this
            many MiB, so later epochs and folds do not re-read Zarr (0: always re-read; only
            used with ``workers=0``).
    """

    model: str = "abmil"
    hidden_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.25
    standardize: bool = True
    n_heads: int = 8
    n_layers: int = 2
    k: int = 5
    folds: int = 5
    val_fraction: float = 0.2
    epochs: int = 50
    patience: int = 10
    min_epochs: int = 5
    monitor: str = "auc"
    lr: float = 2e-4
    weight_decay: float = 1e-5
    balance: str = "weights"
    max_tiles: int | None = 8192
    skip_flagged_tiles: bool = False
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    threads: int | None = None
    cache_mb: int = 2048

    def __post_init__(self) -> None:
        for message, parameters in self._problems():
            raise ConfigError(message, parameters=parameters)

    def _problems(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """Each invalid setting: the message and the fields it names (the first is raised)."""
        valid = learner_names()
        if self.model not in valid:
            yield f"model {self.model!r}: not a MIL model; valid: {', '.join(valid)}", ("model",)
        for name in ("hidden_dim", "attention_dim", "n_heads", "n_layers", "k", "epochs"):
            if getattr(self, name) < 1:
                yield f"{name} must be >= 1, got {getattr(self, name)}", (name,)
        if self.model == "transmil" and self.hidden_dim % self.n_heads:
            yield (
                f"hidden_dim {self.hidden_dim} must be a multiple of n_heads {self.n_heads}",
                ("hidden_dim", "n_heads"),
            )
        if self.folds < 2:
            yield f"folds must be >= 2, got {self.folds}", ("folds",)
        if not 0.0 <= self.dropout < 1.0:
            yield f"dropout must be in [0, 1), got {self.dropout}", ("dropout",)
        if not 0.0 <= self.val_fraction < 0.5:
            yield f"val_fraction must be in [0, 0.5), got {self.val_fraction}", ("val_fraction",)
        if self.patience < 1 or self.min_epochs < 0:
            yield (
                f"patience must be >= 1 and min_epochs >= 0, got {self.patience}, {self.min_epochs}",
                ("patience", "min_epochs"),
            )
        if self.monitor not in MONITORS:
            yield (
                f"monitor must be one of {', '.join(MONITORS)}; got {self.monitor!r}",
                ("monitor",),
            )
        if self.balance not in BALANCE_MODES:
            yield (
                f"balance must be one of {', '.join(BALANCE_MODES)}; got {self.balance!r}",
                ("balance",),
            )
        if not self.lr > 0 or self.weight_decay < 0:
            yield (
                f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}",
                ("lr", "weight_decay"),
            )
        if self.max_tiles is not None and self.max_tiles < 1:
            yield f"max_tiles must be >= 1 or None, got {self.max_tiles}", ("max_tiles",)
        if self.threads is not None and self.threads < 1:
            yield f"threads must be >= 1 or None, got {self.threads}", ("threads",)
        if self.workers < 0 or self.cache_mb < 0:
            yield (
                f"workers and cache_mb must be >= 0, got {self.workers}, {self.cache_mb}",
                ("workers", "cache_mb"),
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MILConfig:
        """The config of a saved run; unknown keys (from a newer wsi-ssl) are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown MILConfig keys {unknown}; valid keys: {', '.join(sorted(names))}"
            )
        return cls(**data)
