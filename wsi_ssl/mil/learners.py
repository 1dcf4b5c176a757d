"""The ``Learner`` protocol: what cross-validation needs from a way of classifying slides.

A learner fits one fold (:meth:`Learner.fit_fold`) and returns the test slides' class
probabilities and its checkpoint; it turns a checkpoint back into a :class:`Predictor`
(:meth:`Learner.load`). Every MIL model of :mod:`wsi_ssl.mil.models` is learnt by
:class:`~wsi_ssl.mil.fitting.TorchLearner` (gradient descent with early stopping); other
learners register here, such as ``"retrieval"`` (:mod:`wsi_ssl.mil.retrieval`, no training).

Importing this module loads no torch (``MILConfig`` validates its ``model`` against
:func:`learner_names`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from wsi_ssl.mil.models.registry import MODELS
from wsi_ssl.registry import Registry

if TYPE_CHECKING:
    import torch

    from wsi_ssl.mil.config import MILConfig
    from wsi_ssl.mil.data import BagCache, BagDataset, BagRef
    from wsi_ssl.mil.matching import MatchReport

__all__ = [
    "LEARNERS",
    "CVContext",
    "FoldFit",
    "FoldSplit",
    "Learner",
    "Predictor",
    "get_learner",
    "learner_names",
    "register_learner",
]


@dataclass(frozen=True)
class FoldSplit:
    """Slide rows of one fold: ``test`` is the fold, ``rest`` the others, split into
    ``train`` and ``val`` (early stopping; empty with ``note`` saying why)."""

    fold: int
    seed: int
    test: np.ndarray
    rest: np.ndarray
    train: np.ndarray
    val: np.ndarray
    note: str | None = None


@dataclass
class CVContext:
    """What every fold of one cross-validation shares."""

    config: MILConfig
    report: MatchReport
    refs: list[BagRef]
    y: np.ndarray
    bags: BagDataset
    cache: BagCache | None
    device: torch.device
    log: Callable[[str], None] | None = None

    @property
    def classes(self) -> list[str]:
        return self.report.classes


@dataclass
class FoldFit:
    """What a learner made of one fold: the test slides' probabilities (n_test, C), the
    checkpoint entries it adds, and how the fit went."""

    probabilities: np.ndarray
    checkpoint: dict[str, Any]
    n_train: int
    n_val: int
    seen: int
    best_epoch: int | None = None  # numbered from 1, as the history numbers epochs
    epochs_run: int = 0
    best_val: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None


class Predictor(Protocol):
    """One fold's fitted model."""

    def predict(
        self, bag: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None, list[tuple[str, float]]]:
        """``(probabilities (C,), attention (N,) or None, [(neighbour slide, similarity)])``."""
        ...


class Learner(Protocol):
    """A way of fitting a slide classifier on one fold."""

    name: str

    def check_folds(self, folds: np.ndarray, config: MILConfig) -> None:
        """Refuse, before any fold is fitted, settings these folds cannot use (``folds``:
        each slide's test fold, 0 .. n-1); what every learner needs (each class in each
        fold's training slides) :mod:`wsi_ssl.mil.cv` checks beside it.

        Raises:
            ConfigError: naming the setting and what to do.
        """
        ...

    def fit_fold(self, split: FoldSplit, context: CVContext) -> FoldFit: ...

    def load(
        self, checkpoint: dict[str, Any], config: MILConfig, device: torch.device
    ) -> Predictor: ...

    def stop_text(self, best_epoch: int | None, epochs_run: int, config: MILConfig) -> str:
        """How a fold's fit ended, for the report (e.g. "best epoch 4 of 9")."""
        ...


LEARNERS: Registry[Callable[[], Learner]] = Registry(
    "MIL learner", builtins={"retrieval": "wsi_ssl.mil.retrieval"}
)
register_learner = LEARNERS.register


def learner_names() -> list[str]:
    """Every valid ``MILConfig.model``: the MIL models and the other learners (no imports)."""
    return sorted({*MODELS.names(), *LEARNERS.names()})


def get_learner(name: str) -> Learner:
    """The learner of ``MILConfig.model`` ``name``.

    Raises:
        ConfigError: no such model or learner.
    """
    if name in LEARNERS:
        return LEARNERS.get(name)()
    from wsi_ssl.mil.fitting import TorchLearner

    MODELS.get(name)  # raises for an unknown name
    return TorchLearner(name)
