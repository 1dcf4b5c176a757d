"""How good an encoder's features are: k-NN and linear-probe accuracy on labelled tiles.

The labelled set is a folder with one sub-folder per class holding images (PNG, JPEG, TIFF)::

    labelled/
        tumour/  a.png b.png ...
        stroma/  ...

Every image is converted to RGB, resized to the encoder's ``input_size`` and normalised as the
encoder's description says; its features are L2-normalised. Accuracy is estimated by
stratified k-fold cross-validation (deterministic for a seed):

- k-NN: cosine-similarity nearest neighbours, majority vote (the DINO paper's evaluation,
  Caron et al., 2021, uses a weighted 20-NN on ImageNet);
- linear probe: multinomial logistic regression on standardised features.

Compare an encoder with the same architecture at random initialisation
(:func:`wsi_ssl.ssl.random_encoder`) to see whether pretraining learnt anything.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from wsi_ssl.errors import ConfigError
from wsi_ssl.ssl.encoder import LoadedEncoder, load_encoder

__all__ = ["IMAGE_SUFFIXES", "EvalResult", "evaluate", "extract_features", "load_image_folder"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})


@dataclass(frozen=True)
class EvalResult:
    """Cross-validated accuracies of an encoder on a labelled tile set."""

    knn_accuracy: float
    linear_accuracy: float | None
    n_images: int
    classes: tuple[str, ...]
    k: int
    folds: int
    chance: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d


def load_image_folder(folder: str | Path) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """``(images as uint8 RGB arrays, integer labels, class names)`` of a class-per-folder set."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder of labelled images (one sub-folder per class)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as im:
                    images.append(np.asarray(im.convert("RGB")))
            except OSError as err:
                raise ConfigError(f"{path}: not a readable image ({err})") from err
            labels.append(label)
    counts = np.bincount(labels, minlength=len(classes)) if labels else np.zeros(0, int)
    if len(classes) < 2 or (counts < 2).any():
        raise ConfigError(
            f"{folder}: need at least 2 class folders with at least 2 images each; found "
            f"{dict(zip(classes, counts.tolist(), strict=True)) or 'none'}"
        )
    return images, np.asarray(labels), classes


@torch.no_grad()
def extract_features(
    encoder: LoadedEncoder, images: Sequence[np.ndarray], *, batch_size: int = 64
) -> np.ndarray:
    """L2-normalised ``(N, D)`` float32 features of uint8 RGB images of any sizes."""
    size = encoder.input_size
    resized = [
        np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR))
        if im.shape[:2] != (size, size)
        else im
        for im in images
    ]
    feats = encoder.embed(np.stack(resized), batch_size=batch_size)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return (feats / np.maximum(norms, 1e-12)).astype(np.float32)


def evaluate(
    encoder: LoadedEncoder | str | Path,
    folder: str | Path,
    *,
    k: int = 10,
    folds: int = 5,
    linear: bool = True,
    seed: int = 0,
) -> EvalResult:
    """k-NN (and linear-probe) accuracy of ``encoder``'s features on a labelled folder.

    Args:
        encoder: a :class:`LoadedEncoder` or a path for :func:`load_encoder`.
        folder: one sub-folder of images per class.
        k: neighbours of the k-NN classifier (capped at the training fold's size).
        folds: cross-validation folds (capped at the smallest class's size).
        linear: also fit a logistic-regression probe.
        seed: fold assignment.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not isinstance(encoder, LoadedEncoder):
        encoder = load_encoder(encoder)
    images, labels, classes = load_image_folder(folder)
    feats = extract_features(encoder, images)
    n_folds = max(2, min(folds, int(np.bincount(labels).min())))
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    knn_hits = 0
    lin_hits = 0
    k_used = k
    for train, test in splitter.split(feats, labels):
        k_used = max(1, min(k, len(train)))
        knn = KNeighborsClassifier(n_neighbors=k_used, metric="cosine")
        knn.fit(feats[train], labels[train])
        knn_hits += int((knn.predict(feats[test]) == labels[test]).sum())
        if linear:
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence notes on tiny folds
                probe.fit(feats[train], labels[train])
            lin_hits += int((probe.predict(feats[test]) == labels[test]).sum())
    n = len(labels)
    return EvalResult(
        knn_accuracy=knn_hits / n,
        linear_accuracy=lin_hits / n if linear else None,
        n_images=n,
        classes=tuple(classes),
        k=k_used,
        folds=n_folds,
        chance=float(np.bincount(labels).max() / n),
    )
