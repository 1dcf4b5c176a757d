"""The trained encoder: ``load_encoder(path)`` gives the teacher backbone and its description.

API (what the embedding job builds on)::

    from wsi_ssl.ssl import load_encoder

    encoder = load_encoder("runs/dino")          # a run dir, a step_*.pt or an encoder.pt
    model, description = encoder                 # it is a NamedTuple (model, description)
    features = model(x)                          # x: (B, 3, S, S) float, normalised as below
    encoder.embed(tiles_uint8)                   # (B, H, W, 3) uint8 -> (B, D) float32 numpy

``model`` is the teacher backbone (the network DINO evaluates, Caron et al., 2021), in eval
mode with gradients off, mapping ``(B, 3, H, W)`` float input to ``(B, D)`` features.
Input is RGB scaled to [0, 1], resized to ``input_size`` (any size works for the CNNs and, with
position embeddings interpolated, for the ViTs, but ``input_size`` is what it trained on),
then normalised: ``(x - mean) / std``.

``description`` is JSON-able::

    {"arch", "family", "embed_dim", "patch_size", "input_size", "mean", "std",
     "output": "cls" | "cls+mean",   # how a ViT's tokens are pooled (cls+mean: 2x the width)
     "resize": "bilinear",            # tiles of another size are resized to input_size
     "precision": "fp32", "which": "teacher" | "student",
     "step", "epoch", "total_steps", "finished", "tile_size", "mpp",
     "checkpoint", "format", "wsi_ssl_version", "torch_version",
     "pretrain_config": {...PretrainConfig...},
     "sources": {"roots", "n_slides", "n_tiles", "tile_size", "tile_sizes", "mpp", "slides": [...]}}

Errors: a missing, truncated or corrupt file, a file that is not a wsi-ssl checkpoint, or one
for another architecture than ``arch=`` asks for: :class:`~wsi_ssl.errors.CheckpointError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsi_ssl.errors import CheckpointError
from wsi_ssl.ssl.backbones import build_backbone, get_spec
from wsi_ssl.ssl.checkpoint import ENCODER_FORMAT, latest_checkpoint, load_checkpoint
from wsi_ssl.ssl.config import PretrainConfig

__all__ = ["ENCODER_FILE", "LoadedEncoder", "describe_encoder", "load_encoder", "random_encoder"]

ENCODER_FILE = "encoder.pt"
WHICH = ("teacher", "student")


class LoadedEncoder(NamedTuple):
    """``(model, description)``: see the module docstring."""

    model: nn.Module
    description: dict[str, Any]

    @property
    def embed_dim(self) -> int:
        return int(self.description["embed_dim"])

    @property
    def input_size(self) -> int:
        return int(self.description["input_size"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` tiles to the model's normalised ``(B, 3, S, S)`` input."""
        x = torch.as_tensor(np.asarray(tiles) if not isinstance(tiles, torch.Tensor) else tiles)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 (B, H, W, 3) tiles; got {x.dtype} {tuple(x.shape)}")
        x = x.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        size = self.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        mean = torch.tensor(self.description["mean"], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.description["std"], device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def embed(self, tiles: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Features of uint8 ``(B, H, W, 3)`` tiles as a float32 ``(B, D)`` array."""
        out = []
        for start in range(0, len(tiles), batch_size):
            out.append(self.model(self.preprocess(tiles[start : start + batch_size])).float().cpu())
        if not out:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return torch.cat(out).numpy()


def describe_encoder(
    config: PretrainConfig, *, output: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The JSON-able description of an encoder trained with ``config``, pooled as ``output``
    says (default: as its architecture pools; a resumed run keeps its checkpoint's)."""
    spec = get_spec(config.arch)
    output = output or spec.output
    return {
        "arch": spec.name,
        "family": spec.family,
        "embed_dim": spec.embed_dim * (2 if output == "cls+mean" else 1),
        "output": output,
        "patch_size": spec.patch_size,
        "input_size": config.global_crop_size,
        "mean": list(config.mean),
        "std": list(config.std),
        "resize": "bilinear",
        "precision": "fp32",
        "which": "teacher",
        **extra,
    }


def load_encoder(
    path: str | Path,
    *,
    which: str = "teacher",
    device: str | torch.device = "cpu",
    arch: str | None = None,
    finished: bool = False,
) -> LoadedEncoder:
    """The backbone of a ``wsi-ssl pretrain`` run, ready for inference.

    Args:
        path: a run directory (its latest ``checkpoints/step_*.pt``, else its ``encoder.pt``),
            a step checkpoint or an ``encoder.pt``.
        which: ``"teacher"`` (DINO's evaluated network, the default) or ``"student"``
            (step checkpoints only).
        device: where to put the model.
        arch: require this architecture.
        finished: refuse a run directory, or its ``encoder.pt``, whose training did not reach
            its last step (killed, stopped by ``until_step`` or still running); a step
            checkpoint named is taken as is.

    Raises:
        CheckpointError: see the module docstring.
    """
    if which not in WHICH:
        raise CheckpointError(f"which must be one of {', '.join(WHICH)}; got {which!r}")
    path, data = _checkpoint_of(Path(path), arch, finished)
    meta = data["meta"]
    try:
        config = PretrainConfig.from_dict(meta["config"])
    except Exception as err:
        raise CheckpointError(f"{path}: checkpoint config is not valid here ({err})") from err
    if data["format"] == ENCODER_FORMAT:
        if which != "teacher":
            raise CheckpointError(f"{path}: an {ENCODER_FILE} holds the teacher backbone only")
        state = data["teacher_backbone"]
    else:
        # MultiCropModel (DINO) keeps it as backbone.*, the masked recipes as encoder.backbone.*
        state = {
            k.split("backbone.", 1)[1]: v
            for k, v in data[which].items()
            if k.startswith(("backbone.", "encoder.backbone."))
        }
    model = build_backbone(config.arch, drop_path_rate=0.0, input_size=config.global_crop_size)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: weights do not fit a {config.arch} backbone "
            f"({str(err).splitlines()[0]}); the checkpoint is damaged or for another architecture"
        ) from err
    recorded = meta.get("encoder", describe_encoder(config))
    model = _pooled(model, recorded).eval().requires_grad_(False).to(device)
    description = {
        **recorded,
        "which": which,
        "step": meta.get("step"),
        "epoch": meta.get("epoch"),
        "total_steps": meta.get("total_steps"),
        "finished": meta.get("step") == meta.get("total_steps"),
        "tile_size": (meta.get("sources") or {}).get("tile_size"),
        "mpp": (meta.get("sources") or {}).get("mpp"),
        "checkpoint": str(path.resolve()),
        "format": data["format"],
        "wsi_ssl_version": meta.get("wsi_ssl_version"),
        "torch_version": meta.get("torch_version"),
        "pretrain_config": meta["config"],
        "sources": meta.get("sources"),
    }
    return LoadedEncoder(model, description)


def _checkpoint_of(path: Path, arch: str | None, finished: bool) -> tuple[Path, dict[str, Any]]:
    """The checkpoint file ``path`` names (a run directory: its latest) and its contents."""
    if not path.is_dir():
        data = load_checkpoint(path, arch=arch)
        if finished and path.name == ENCODER_FILE:  # the run's encoder, as the run is
            _refuse_unfinished(path.parent, data["meta"], latest_checkpoint(path.parent), path)
        return path, data
    found = latest_checkpoint(path)
    if found is None and (path / ENCODER_FILE).is_file():
        found = path / ENCODER_FILE
    if found is None:
        raise CheckpointError(
            f"{path}: no checkpoints/step_*.pt nor {ENCODER_FILE}; is it a `wsi-ssl pretrain` "
            "run directory?"
        )
    data = load_checkpoint(found, arch=arch)
    if finished:
        _refuse_unfinished(path, data["meta"], found, path)
    return found, data


def _refuse_unfinished(run: Path, meta: dict[str, Any], found: Path | None, named: Path) -> None:
    """Refuse ``named`` (the run ``run`` or its ``encoder.pt``) when the run did not reach its
    last step; ``found``: the step checkpoint that uses it as it is (None: none beside it).

    Raises:
        CheckpointError: naming the step reached, how to resume and the checkpoint to name.
    """
    if meta.get("step") == meta.get("total_steps"):
        return
    what = "an unfinished pretrain run" if named == run else "the encoder of an unfinished run"
    use = f"name a checkpoint to use it as it is ({found})" if found else "name a step checkpoint"
    raise CheckpointError(
        f"{named}: {what} (step {meta.get('step')} of {meta.get('total_steps')}: stopped, killed "
        f"or still running); resume it (wsi-ssl pretrain ... --out {run} --resume), or {use}"
    )


def random_encoder(config: PretrainConfig, *, seed: int = 0, device: str = "cpu") -> LoadedEncoder:
    """The same architecture at random initialisation (the baseline of a learning check)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(config.arch, drop_path_rate=0.0, input_size=config.global_crop_size)
    description = describe_encoder(config, which="random", seed=seed, step=0)
    model = _pooled(model, description).eval().requires_grad_(False).to(device)
    return LoadedEncoder(model, description)


def _pooled(model: nn.Module, description: dict[str, Any]) -> nn.Module:
    """The trained backbone pooled as ``description`` records (runs from before ``output`` was
    recorded output their class token, as their embeddings were made)."""
    from wsi_ssl.encoders._towers import PooledViT

    output = description.get("output", "cls")
    return model if output == "cls" else PooledViT(model, output)
