"""The frozen config of an encoder: everything that decides which vector a tile gets."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from wsi_ssl.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRECISIONS",
    "RESIZE_POLICIES",
    "SOURCES",
    "EncoderConfig",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_POLICIES = ("never", "bilinear")
PRECISIONS = ("fp32", "bf16", "fp16")
SOURCES = ("random", "file", "wsi-ssl")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Fields that are provenance, not identity: they do not change a single output value.
_NOT_IDENTITY = (
    "name",
    "weights_path",
    "description",
    "mpp",
    "licence",
    "model_card",
    "weights_files",
    "stain",
)


@dataclass(frozen=True)
class EncoderConfig:
    """How an encoder turns a uint8 RGB tile into a vector; recorded with every embedding.

    Attributes:
        name: registry name; the readable prefix of the ``encoder_id``.
        arch: architecture, as ``<family>/<name>``: ``builtin/...``, ``timm/...``,
            ``torchvision/...`` or ``wsi-ssl/...``.
        input_size: the square input edge in pixels the model expects.
        embed_dim: length of the output vector.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by after subtracting the mean.
        resize: "never" (tiles of another size are an error) or "bilinear" (antialiased resize
            to ``input_size``; part of the identity, so it gives another ``encoder_id``).
        precision: compute precision on CUDA ("fp32", or autocast "bf16" / "fp16"); on CPU the
            encoder always computes in fp32 so results are bitwise reproducible.
        source: where the weights came from: "random" (seeded init, for tests and
            benchmarks), "file" (a local state-dict file) or "wsi-ssl" (a ``wsi-ssl pretrain``
            run or checkpoint).
        weights_sha256: sha256 of the weights file for source "file"; of the state dict
            (sorted names, dtypes, shapes and bytes) for "random" and "wsi-ssl".
        seed: the init seed for source "random".
        arch_kwargs: extra architecture arguments, as sorted (key, value) pairs.
        weights_path: where the weights were loaded from (provenance only, not identity).
        description: one line for listings (not identity).
        mpp: the scales (µm/px at the model input) the model was trained at; empty when
            unknown (no check). Tiles whose scale at the model input is more than 10% off
            every one of them are refused at embed time unless the check is switched off.
        licence: the weights' licence as its model card states it (not identity).
        model_card: where the published weights are (not identity).
        weights_files: the file names the model card publishes that this preset reads.
        stain: the stain normalisation the encoder was pretrained with (``method``,
            ``reference``, ``reference_path``, ``reference_sha256``; a ``wsi-ssl pretrain``
            run that normalised its tiles), which embedding applies by default; None: none.
    """

    name: str
    arch: str
    input_size: int
    embed_dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "never"
    precision: str = "fp32"
    source: str = "file"
    weights_sha256: str = ""
    seed: int | None = None
    arch_kwargs: tuple[tuple[str, Any], ...] = ()
    weights_path: str | None = field(default=None, compare=False)
    description: str = field(default="", compare=False)
    mpp: tuple[float, ...] = field(default=(), compare=False)
    licence: str = field(default="", compare=False)
    model_card: str = field(default="", compare=False)
    weights_files: tuple[str, ...] = field(default=(), compare=False)
    stain: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(
                f"encoder name {self.name!r}: use letters, digits, '_', '.' and '-' only"
            )
        if "/" not in self.arch:
            raise ConfigError(f"arch {self.arch!r}: expected '<family>/<name>'")
        if self.input_size < 16:
            raise ConfigError(f"input_size must be >= 16, got {self.input_size}")
        if self.embed_dim < 1:
            raise ConfigError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise ConfigError(f"mean and std need 3 values, std > 0; got {self.mean}, {self.std}")
        if self.resize not in RESIZE_POLICIES:
            raise ConfigError(
                f"resize must be one of {', '.join(RESIZE_POLICIES)}; got {self.resize!r}",
                parameters=("resize",),
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}",
                parameters=("precision",),
            )
        if self.source not in SOURCES:
            raise ConfigError(f"source must be one of {', '.join(SOURCES)}; got {self.source!r}")
        # normalise to tuples of floats so equal configs hash equally
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "mpp", tuple(float(v) for v in self.mpp))
        object.__setattr__(self, "weights_files", tuple(str(v) for v in self.weights_files))
        if any(v <= 0 for v in self.mpp):
            raise ConfigError(f"mpp values must be > 0, got {self.mpp}")
        object.__setattr__(
            self,
            "arch_kwargs",
            tuple(sorted((str(k), v) for k, v in dict(self.arch_kwargs).items())),
        )

    # -- identity ------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """The fields that decide the output values (everything but provenance)."""
        d = self.to_dict()
        for key in _NOT_IDENTITY:
            d.pop(key)
        return d

    @property
    def encoder_id(self) -> str:
        """``<name>-<12 hex>``: a short, stable hash of the identity fields and weights."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    # -- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["mpp"] = list(self.mpp)
        d["weights_files"] = list(self.weights_files)
        d["arch_kwargs"] = {k: v for k, v in self.arch_kwargs}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in ("mean", "std", "mpp", "weights_files"):
            if key in values:
                values[key] = tuple(values[key])
        if "arch_kwargs" in values:
            values["arch_kwargs"] = tuple(dict(values["arch_kwargs"]).items())
        return cls(**values)
