"""Retrieval baseline: a slide takes the majority label of its nearest labelled slides.

Each slide is summarised by one vector, the mean of its L2-normalised tile embeddings,
L2-normalised again; labelled slides go into a FAISS ``IndexFlatIP`` (exact inner product =
cosine similarity) and a query slide's ``k`` nearest neighbours vote. This is the slide-level
search baseline of retrieval papers in computational pathology (e.g. Yottixel, Kalra et al.
2020; RetCCL, Wang et al. 2023) reduced to its simplest form, and needs no training.

The index is built here with ``faiss`` directly (an exact flat index over at most a few
thousand slide vectors); it does not go through ``wsi_ssl.search``. :class:`RetrievalLearner`
makes it a cross-validation learner (``MILConfig(model="retrieval")``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl.errors import ConfigError
from wsi_ssl.mil.learners import CVContext, FoldFit, FoldSplit, register_learner

if TYPE_CHECKING:
    import torch

    from wsi_ssl.mil.config import MILConfig

__all__ = ["RetrievalClassifier", "RetrievalLearner", "largest_voting_k", "slide_vector"]


def largest_voting_k(candidates: int) -> int:
    """The largest ``k`` whose vote among ``candidates`` labelled slides still depends on
    similarity (0: none does). A ``k`` that takes them all lets every one vote, whatever the
    query; MIL retrieval (``MILConfig.k``) and the evaluation's mMV@k share this rule."""
    return max(0, candidates - 1)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def slide_vector(features: np.ndarray) -> np.ndarray:
    """The slide's vector (D,): mean of the L2-normalised tiles, L2-normalised."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"a bag is a non-empty (N, D) array, got shape {features.shape}")
    return _normalise(_normalise(features).mean(axis=0))


class RetrievalClassifier:
    """Majority vote of the ``k`` most similar labelled slides.

    Probabilities are the vote shares; a tie between classes is broken by the summed
    similarity of their voters (shifting the shares by at most ``1e-3``).

    Args:
        n_classes: number of classes.
        k: voters per query (capped at the number of labelled slides).
    """

    def __init__(self, n_classes: int, k: int = 5) -> None:
        self.n_classes = n_classes
        self.k = k
        self.vectors = np.zeros((0, 0), dtype=np.float32)
        self.labels = np.zeros(0, dtype=np.int64)
        self.slide_ids: list[str] = []
        self._index: Any = None

    def fit(
        self, vectors: np.ndarray, labels: np.ndarray, slide_ids: list[str] | None = None
    ) -> RetrievalClassifier:
        """Index labelled slide vectors (n, D)."""
        import faiss

        self.vectors = np.ascontiguousarray(_normalise(vectors))
        self.labels = np.asarray(labels, dtype=np.int64)
        self.slide_ids = list(slide_ids or [str(i) for i in range(len(self.labels))])
        self._index = faiss.IndexFlatIP(self.vectors.shape[1])
        self._index.add(self.vectors)
        return self

    def kneighbors(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and row indices (m, k) of the nearest labelled slides."""
        if self._index is None:
            raise RuntimeError("RetrievalClassifier: call fit() first")
        k = min(self.k, len(self.labels))
        query = np.ascontiguousarray(_normalise(np.atleast_2d(vectors)))
        sims, idx = self._index.search(query, k)
        return sims, idx

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        """Vote shares (m, n_classes)."""
        sims, idx = self.kneighbors(vectors)
        votes = np.zeros((len(idx), self.n_classes))
        weight = np.zeros_like(votes)
        for row, (s, i) in enumerate(zip(sims, idx, strict=True)):
            np.add.at(votes[row], self.labels[i], 1.0)
            np.add.at(weight[row], self.labels[i], s)
        share = votes / idx.shape[1]
        tie = (weight - weight.min(axis=1, keepdims=True)) / (
            np.ptp(weight, axis=1, keepdims=True) + 1e-12
        )
        probs = share + 1e-3 * tie * (votes > 0)
        return probs / probs.sum(axis=1, keepdims=True)

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores (tensors and plain lists)."""
        import torch

        return {
            "vectors": torch.from_numpy(self.vectors),
            "labels": torch.from_numpy(self.labels),
            "slide_ids": list(self.slide_ids),
            "k": self.k,
            "n_classes": self.n_classes,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RetrievalClassifier:
        model = cls(int(state["n_classes"]), int(state["k"]))
        return model.fit(
            np.asarray(state["vectors"]), np.asarray(state["labels"]), list(state["slide_ids"])
        )


class _RetrievalPredictor:
    """A fitted :class:`RetrievalClassifier` as a :class:`~wsi_ssl.mil.learners.Predictor`."""

    def __init__(self, classifier: RetrievalClassifier) -> None:
        self.classifier = classifier

    def predict(
        self, bag: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None, list[tuple[str, float]]]:
        vector = slide_vector(np.asarray(bag, dtype=np.float32))[None]
        clf = self.classifier
        sims, idx = clf.kneighbors(vector)
        neighbours = [(clf.slide_ids[i], float(s)) for s, i in zip(sims[0], idx[0], strict=True)]
        return clf.predict_proba(vector)[0], None, neighbours


@register_learner("retrieval")
class RetrievalLearner:
    """The retrieval baseline as a learner: fits on every non-test slide of a fold (no
    validation split), caching each slide's vector across folds."""

    name = "retrieval"

    def __init__(self) -> None:
        self._vectors: dict[int, np.ndarray] = {}

    def _vector(self, row: int, context: CVContext) -> np.ndarray:
        if row not in self._vectors:
            self._vectors[row] = slide_vector(context.bags.raw(row))
        return self._vectors[row]

    def check_folds(self, folds: np.ndarray, config: MILConfig) -> None:
        """Refuse a ``k`` that lets every training slide of some fold vote: each of its
        test slides would get the same vote, similarity playing no part.

        Raises:
            ConfigError: naming ``k``, the fold with the fewest training slides and their count.
        """
        n_train, fold = min((int(np.sum(folds != f)), f) for f in range(int(folds.max()) + 1))
        largest = largest_voting_k(n_train)
        if config.k <= largest:
            return
        advice = (
            f"use k={largest} or fewer, or label more slides" if largest else "label more slides"
        )
        raise ConfigError(
            f"k={config.k} lets all {n_train} training slides of fold {fold} vote for each of "
            f"its test slides, so the retrieval vote ignores similarity; {advice}",
            parameters=("k",),
        )

    def fit_fold(self, split: FoldSplit, context: CVContext) -> FoldFit:
        fit_rows = [int(i) for i in split.rest]
        vectors = np.stack([self._vector(i, context) for i in fit_rows])
        tests = np.stack([self._vector(int(i), context) for i in split.test])
        slides = context.report.slides
        clf = RetrievalClassifier(len(context.classes), context.config.k).fit(
            vectors, context.y[split.rest], [slides[i].slide_id for i in fit_rows]
        )
        checkpoint = {"kind": "retrieval", "best_epoch": None, "retrieval": clf.state()}
        return FoldFit(
            clf.predict_proba(tests), checkpoint, n_train=len(fit_rows), n_val=0, seen=len(fit_rows)
        )

    def load(
        self, checkpoint: dict[str, Any], config: MILConfig, device: torch.device
    ) -> _RetrievalPredictor:
        return _RetrievalPredictor(RetrievalClassifier.from_state(checkpoint["retrieval"]))

    def stop_text(self, best_epoch: int | None, epochs_run: int, config: MILConfig) -> str:
        return f"{config.k}-NN vote"
