"""What an evaluation compares: encoder specs and the settings shared by every task."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from wsi_ssl.errors import ConfigError

__all__ = ["EncoderSpec", "EvaluationConfig"]


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder to evaluate: anything :func:`wsi_ssl.encoders.create_encoder` accepts.

    Attributes:
        spec: a registered name, ``timm/<arch>``, ``torchvision/<arch>``, a ``wsi-ssl pretrain``
            run directory or checkpoint.
        weights: a local weights file, ``"random"`` for a seeded init, or None (the encoder's
            default).
        seed: init seed of random-init encoders.
        label: the name shown in the table (default: the encoder's name, or its
            ``encoder_id`` when two encoders share a name).
        resize: the encoder's resize policy for tiles of another size ("bilinear" embeds
            256 px tiles with a 224 px encoder), or None (the encoder's own).
    """

    spec: str
    weights: str | None = None
    seed: int = 0
    label: str | None = None
    resize: str | None = None

    @classmethod
    def parse(cls, text: str) -> EncoderSpec:
        """``NAME[,weights=FILE|random][,seed=N][,label=TEXT][,resize=bilinear|never]`` (the
        CLI's ``--encoder``)."""
        name, *options = (part.strip() for part in text.split(","))
        if not name:
            raise ConfigError(f"encoder spec {text!r}: starts with an empty encoder name")
        values: dict[str, Any] = {}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key not in ("weights", "seed", "label", "resize") or not value:
                raise ConfigError(
                    f"encoder spec {text!r}: {option!r} is not weights=FILE, seed=N, "
                    "label=TEXT or resize=bilinear|never"
                )
            values[key] = value
        if "seed" in values:
            try:
                values["seed"] = int(values["seed"])
            except ValueError:
                raise ConfigError(f"encoder spec {text!r}: seed must be an integer") from None
        return cls(name, **values)


@dataclass(frozen=True)
class EvaluationConfig:
    """Settings shared by every encoder, so that they see the same folds and resamples.

    Attributes:
        folds: cross-validation folds (capped per task by the smallest class).
        seed: seeds folds, probes, MIL training and bootstrap resamples.
        n_bootstrap: bootstrap resamples for the confidence intervals (0: no intervals).
        confidence: two-sided level of the intervals.
        knn_k: neighbours of the k-NN probe (cosine similarity).
        linear: also fit the logistic-regression probe.
        max_tiles_per_class: tiles per class kept for a per-tile labels task (evenly spread).
        mil_epochs: epochs of each ABMIL fold (no inner validation split: the evaluation
            compares encoders, not stopping rules).
        mmv_k: retrieved slides that vote in mMV@k.
        precision_k: retrieved tiles of precision@k.
        device: where encoders and MIL run ("cpu", "cuda", "auto").
        batch_size: images per encoder forward pass.
        workers: tile-decoding worker processes of the embed job (0: in this process).
        threads: torch CPU threads for MIL training (None: torch's default; 1 is often
            fastest for small bags on a busy machine).
        check_mpp: refuse to embed an archive's slides tiled at another µm/px than an encoder
            was trained at (as ``embed`` does); False embeds them at their scale anyway.
    """

    folds: int = 5
    seed: int = 0
    n_bootstrap: int = 1000
    confidence: float = 0.95
    knn_k: int = 20
    linear: bool = True
    max_tiles_per_class: int = 2000
    mil_epochs: int = 30
    mmv_k: int = 5
    precision_k: int = 10
    device: str = "cpu"
    batch_size: int = 64
    workers: int = 0
    threads: int | None = None
    check_mpp: bool = True

    def __post_init__(self) -> None:
        positive = ("folds", "knn_k", "max_tiles_per_class", "mil_epochs", "mmv_k")
        for name in (*positive, "precision_k", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{name} must be >= 1, got {getattr(self, name)}", parameters=(name,)
                )
        if self.folds < 2:
            raise ConfigError(f"folds must be >= 2, got {self.folds}", parameters=("folds",))
        if self.n_bootstrap < 0 or self.workers < 0:
            raise ConfigError(
                f"n_bootstrap and workers must be >= 0, got {self.n_bootstrap}, {self.workers}",
                parameters=("n_bootstrap", "workers"),
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(
                f"threads must be >= 1 or None, got {self.threads}", parameters=("threads",)
            )
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(
                f"confidence must be in [0.5, 1), got {self.confidence}", parameters=("confidence",)
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
