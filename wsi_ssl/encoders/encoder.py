"""An :class:`Encoder`: a frozen config plus the module, with the preprocessing it prescribes."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsi_ssl.device import resolve_device
from wsi_ssl.encoders.config import EncoderConfig
from wsi_ssl.errors import (
    ConfigError,
    EncoderMismatchError,
    InputSizeMismatchError,
    MagnificationMismatchError,
)

if TYPE_CHECKING:
    from wsi_ssl.slide import SlideReader

__all__ = ["AUTOCAST_DTYPES", "MPP_TOLERANCE", "Encoder", "Preprocess"]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MPP_TOLERANCE = 0.1  # relative: tiles within 10% of a trained scale pass the check


@dataclass(frozen=True)
class Preprocess:
    """uint8 (B, H, W, 3) -> float32 (B, 3, S, S): ``x / 255``, optional antialiased bilinear
    resize (only when the config allows it), ``(x - mean) / std``; whole-batch tensor ops on
    the tiles' device, identical bits wherever it runs."""

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str

    @classmethod
    def from_config(cls, config: EncoderConfig) -> Preprocess:
        return cls(config.name, config.input_size, config.mean, config.std, config.resize)

    def check_input_size(self, height: int, width: int, where: str = "input") -> bool:
        """True when tiles need resizing; raise when they do and the config forbids it."""
        if (height, width) == (self.input_size, self.input_size):
            return False
        if self.resize == "never":
            raise InputSizeMismatchError(where, max(height, width), self.input_size, self.name)
        return True

    def __call__(self, tiles: torch.Tensor, where: str = "input") -> torch.Tensor:
        if not isinstance(tiles, torch.Tensor):
            raise ConfigError(
                f"{where}: expected a torch tensor of uint8 RGB tiles (B, H, W, 3), got "
                f"{type(tiles).__name__}; Encoder.embed_images takes numpy arrays"
            )
        if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ConfigError(
                f"{where}: expected uint8 RGB tiles (B, H, W, 3), got {tuple(tiles.shape)} "
                f"{tiles.dtype}"
            )
        b, h, w, _ = tiles.shape
        resize = self.check_input_size(int(h), int(w), where)
        x = torch.empty((b, 3, h, w), dtype=torch.float32, device=tiles.device)
        x.copy_(tiles.permute(0, 3, 1, 2))  # convert and transpose in one pass
        if resize:
            size = self.input_size
            x = F.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device)
        scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
        shift = (-mean / std).view(1, 3, 1, 1)
        return torch.addcmul(shift, x, scale, out=x)


class Encoder:
    """A tile encoder: ``encoder(tiles_uint8_nhwc) -> (B, embed_dim)`` float32 vectors.

    The module is in eval mode with gradients off. Preprocessing runs on the encoder's device
    as whole-batch tensor ops: uint8 NHWC -> float, optional antialiased bilinear resize (only
    when ``config.resize`` allows it), then ``(x / 255 - mean) / std``. On CUDA the forward pass
    runs under autocast when ``config.precision`` is "bf16" or "fp16"; on CPU always in fp32.
    """

    def __init__(self, model: nn.Module, config: EncoderConfig) -> None:
        self.model = model.eval().requires_grad_(False)
        self.config = config
        self._device = torch.device("cpu")
        self._forward: nn.Module | Any = self.model  # the model, or its torch.compile wrapper
        self._channels_last = False

    def __repr__(self) -> str:
        return f"Encoder({self.encoder_id!r}, arch={self.config.arch!r}, device={self.device})"

    # -- identity ------------------------------------------------------------------------
    @property
    def encoder_id(self) -> str:
        return self.config.encoder_id

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def input_size(self) -> int:
        return self.config.input_size

    def describe(self) -> dict[str, Any]:
        """JSON-able: the config plus the ``encoder_id``."""
        return {"encoder_id": self.encoder_id, **self.config.to_dict()}

    # -- device ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device | None) -> Encoder:
        """Move to ``device`` ("auto", "cpu", "cuda", "cuda:1"); returns self."""
        dev = resolve_device(device)
        self._channels_last = dev.type == "cuda" and _is_cnn(self.model)
        self.model.to(dev)
        if self._channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._device = dev
        return self

    def compile(self, **options: Any) -> Encoder:
        """Run the forward pass through ``torch.compile(model, **options)`` (kernels fused
        for the device; the first batches of each shape pay the compile time); returns self."""
        self._forward = torch.compile(self.model, **options)
        return self

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the config's precision on CUDA; a no-op on CPU or for fp32."""
        if self._device.type == "cuda" and self.config.precision in AUTOCAST_DTYPES:
            return torch.autocast("cuda", dtype=AUTOCAST_DTYPES[self.config.precision])
        return contextlib.nullcontext()

    @property
    def compute(self) -> dict[str, Any]:
        """How vectors are computed here (recorded with embeddings; not part of the id)."""
        autocast = (
            self.config.precision
            if self._device.type == "cuda" and self.config.precision in AUTOCAST_DTYPES
            else "fp32"
        )
        return {
            "device": str(self._device),
            "precision": autocast,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }

    # -- preprocessing and forward -----------------------------------------------------------
    @property
    def preprocessor(self) -> Preprocess:
        """The config's preprocessing as a small picklable callable (used by loader workers)."""
        return Preprocess.from_config(self.config)

    def check_input_size(self, height: int, width: int, where: str = "input") -> bool:
        """True when tiles need resizing; raise when they do and the config forbids it."""
        return self.preprocessor.check_input_size(height, width, where)

    def check_tiles(
        self, tile_size: int, width: int, mpp: float | None, where: str = "input"
    ) -> None:
        """Raise unless tiles of ``tile_size`` x ``width`` px at ``mpp`` µm/px (None: scale not
        checked) can be embedded; a size refusal advises re-tiling at the trained scale too
        when resized tiles would fail the scale check."""
        try:
            self.check_input_size(tile_size, width, where)
        except InputSizeMismatchError:
            if mpp is not None and self.config.mpp:
                seen = float(mpp) * tile_size / self.config.input_size
                best = min(self.config.mpp, key=lambda m: abs(seen - m))
                if not any(abs(seen - m) <= MPP_TOLERANCE * m for m in self.config.mpp):
                    raise InputSizeMismatchError(
                        where, tile_size, self.config.input_size, self.config.name, (seen, best)
                    ) from None
            raise
        self.check_scale(mpp, tile_size, where)

    def check_scale(self, mpp: float | None, tile_size: int, where: str = "input") -> None:
        """Raise when tiles of ``tile_size`` px at ``mpp`` µm/px reach the model at a scale
        more than 10% off every scale in ``config.mpp`` (no check when either is unknown)."""
        if not self.config.mpp or mpp is None:
            return
        seen = float(mpp) * tile_size / self.config.input_size  # µm/px at the model input
        if any(abs(seen - m) <= MPP_TOLERANCE * m for m in self.config.mpp):
            return
        trained = " or ".join(f"{m:g}" for m in self.config.mpp)
        best = min(self.config.mpp, key=lambda m: abs(seen - m))
        size = self.config.input_size  # advise no smaller tiles than it takes: no upsampling
        size = max(tile_size, size) if self.config.resize != "never" else size
        raise MagnificationMismatchError(
            f"{where}: tiles of {tile_size} px at {float(mpp):g} µm/px reach encoder "
            f"{self.config.name!r} at {seen:.3g} µm/px, but it was trained at {trained} µm/px; "
            f"re-tile with tile_size={size} and mpp={best * self.config.input_size / size:.4g}, "
            "or pass check_mpp=False to embed at this scale anyway",
            parameters=("tile_size", "mpp", "check_mpp"),
        )

    def preprocess(self, tiles: torch.Tensor, where: str = "input") -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised float32 (B, 3, S, S) on the tiles' device."""
        return self.preprocessor(tiles, where)

    def forward_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        """The module on already normalised input (the benchmark's device-only baseline)."""
        if self._channels_last:  # CNNs on CUDA: NHWC convolutions (tensor-core friendly)
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            out = self._forward(x)
        if out.ndim != 2 or out.shape[1] != self.config.embed_dim:
            raise EncoderMismatchError(
                f"encoder {self.config.name!r} returned shape {tuple(out.shape)}, its config says "
                f"(B, {self.config.embed_dim}); fix embed_dim or the architecture"
            )
        return out.float()

    def __call__(self, tiles: torch.Tensor, where: str = "input") -> torch.Tensor:
        """uint8 (B, H, W, 3) tiles on the encoder's device -> float32 (B, D)."""
        with torch.inference_mode():
            return self.forward_preprocessed(self.preprocess(tiles, where))

    # -- convenience: images and slide regions ---------------------------------------------
    def embed_images(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        *,
        batch_size: int = 64,
        resize: bool = False,
    ) -> np.ndarray:
        """Vectors (N, D) float32 of uint8 RGB images (N, H, W, 3) or a list of equal-size ones.

        Args:
            resize: allow resizing to ``input_size`` for this call (an explicit choice for
                query images; tiles from the job follow the config only).
        """
        arr = np.stack([_rgb(i) for i in images]) if not isinstance(images, np.ndarray) else images
        if arr.ndim == 3:
            arr = arr[None]
        arr = np.ascontiguousarray(_rgb(arr))
        if resize and arr.shape[1:3] != (self.input_size, self.input_size):
            return np.concatenate([self._resized(batch) for batch in _batches(arr, batch_size)])
        out = [
            self(torch.from_numpy(b).to(self._device)).cpu().numpy()
            for b in _batches(arr, batch_size)
        ]
        return np.concatenate(out) if out else np.empty((0, self.embed_dim), np.float32)

    def _resized(self, batch: np.ndarray) -> np.ndarray:
        size = self.input_size
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self._device).permute(0, 3, 1, 2).float()
            x = F.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
            x = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            return self(x).cpu().numpy()

    def embed_image(self, image: np.ndarray | Any, *, resize: bool = True) -> np.ndarray:
        """The vector (D,) of one RGB image (numpy HxWx3/4 or PIL); non-square images are
        padded with white to a square, then resized to ``input_size`` (unless ``resize=False``,
        which makes a size mismatch an error)."""
        arr = _rgb(np.asarray(image))
        h, w = arr.shape[:2]
        if resize and h != w:
            side = max(h, w)
            square = np.full((side, side, 3), 255, dtype=np.uint8)
            square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = (
                arr
            )
            arr = square
        return self.embed_images(arr[None], resize=resize)[0]

    def embed_region(
        self, slide: SlideReader | str | Path, box: tuple[int, int, int, int]
    ) -> np.ndarray:
        """The vector (D,) of a region of a slide: ``box`` is level-0 ``(x, y, width, height)``.

        The region is read at the coarsest level that still has at least ``input_size`` pixels
        across it, padded with white to a square and resized (antialiased) to ``input_size``;
        ``(x, y, tile_size_level0, tile_size_level0)`` of a tile therefore gives a vector
        comparable to the tile's.
        """
        if isinstance(slide, str | Path):
            from wsi_ssl.slide import open_slide

            with open_slide(slide) as reader:
                return self.embed_region(reader, box)
        x, y, w, h = (int(v) for v in box)
        if w < 1 or h < 1:
            raise ConfigError(f"region box {box}: width and height must be >= 1")
        wanted = max(w, h) / self.input_size  # level-0 px per output px
        downsamples = [float(d) for d in slide.level_downsamples]
        level = max(
            (i for i, d in enumerate(downsamples) if d <= wanted * 1.02),
            default=0,
            key=lambda i: downsamples[i],
        )
        ds = downsamples[level]
        size = (max(1, math.ceil(w / ds)), max(1, math.ceil(h / ds)))
        region = _rgb(np.asarray(slide.read_region((x, y), level, size)))
        return self.embed_image(region, resize=True)


def _is_cnn(model: nn.Module) -> bool:
    """Convolutions beyond a single patch-embedding layer and no attention: a CNN."""
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    attention = any("Attention" in type(m).__name__ for m in model.modules())
    return convs > 1 and not attention


def _rgb(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ConfigError(f"images must be uint8 RGB, got {arr.dtype}")
    if arr.ndim >= 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim < 3 or arr.shape[-1] != 3:
        raise ConfigError(f"images must be RGB (..., H, W, 3), got shape {arr.shape}")
    return arr


def _batches(arr: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(arr), size):
        yield arr[start : start + size]
