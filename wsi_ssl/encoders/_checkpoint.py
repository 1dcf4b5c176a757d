"""Encoders from ``wsi-ssl pretrain``: a run directory or a checkpoint file.

``wsi_ssl.ssl.load_encoder(path)`` returns the teacher backbone (by default) and a JSON-able
description ``{arch, embed_dim, input_size, mean, std, ...}``; this source turns that into an
:class:`Encoder` whose ``weights_sha256`` is the hash of the backbone's state dict (so the same
teacher weights give the same ``encoder_id`` whatever else the checkpoint file holds) and whose
``weights_path`` is the checkpoint. Its ``mpp`` is the scale the run trained at (from the
checkpoint's ``sources``), so ``embed`` refuses tiles at another scale as it does for presets.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsi_ssl.encoders.config import IMAGENET_MEAN, IMAGENET_STD, EncoderConfig
from wsi_ssl.encoders.encoder import Encoder
from wsi_ssl.encoders.registry import register_source, slug
from wsi_ssl.encoders.weights import file_sha256, state_dict_sha256
from wsi_ssl.errors import CheckpointError, ConfigError

__all__ = ["PREFIX", "config_from_description", "is_checkpoint", "trained_mpp"]

PREFIX = "wsi-ssl:"


def is_checkpoint(spec: str) -> bool:
    """``wsi-ssl:<path>``, or any existing file or directory."""
    return spec.startswith(PREFIX) or Path(spec).expanduser().exists()


def _first(desc: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if desc.get(key) is not None:
            return desc[key]
    return default


def _size(value: Any) -> int:
    if isinstance(value, list | tuple):  # (C, H, W) or (H, W)
        value = value[-1]
    return int(value)


def trained_mpp(desc: Mapping[str, Any], input_size: int) -> tuple[float, ...]:
    """The scales (µm/px at the model input) a run trained at: each of its tiles' scales times
    tile size over input size (a whole tile resized to the input, as ``embed`` feeds it);
    empty when the run does not say (an older checkpoint) or trained on several tile sizes."""
    sources = desc.get("sources") or {}
    tile = sources.get("tile_size")
    if not tile or len(sources.get("tile_sizes") or [tile]) > 1:
        return ()
    scales = [float(k) for k in sources.get("scales") or {} if float(k) > 0]
    if not scales and sources.get("mpp"):
        scales = [float(sources["mpp"])]
    return tuple(sorted({round(m * int(tile) / input_size, 4) for m in scales}))


def config_from_description(desc: Mapping[str, Any], path: Path) -> EncoderConfig:
    """Map ``load_encoder``'s description onto an :class:`EncoderConfig` template."""
    arch = _first(desc, "arch", "architecture", "backbone")
    dim = _first(desc, "embed_dim", "output_dim", "num_features", "dim")
    size = _first(desc, "input_size", "image_size", "img_size", "crop_size", "global_crop_size")
    if arch is None or dim is None or size is None:
        raise CheckpointError(
            f"{path}: the checkpoint's encoder description lacks arch, embed_dim or input size "
            f"(has {sorted(desc)}); re-save it with this wsi-ssl version"
        )
    return EncoderConfig(
        name=slug(f"wsi-ssl-{arch}"),
        arch=f"wsi-ssl/{arch}",
        input_size=_size(size),
        embed_dim=int(dim),
        mean=tuple(_first(desc, "mean", default=IMAGENET_MEAN)),  # type: ignore[arg-type]
        std=tuple(_first(desc, "std", default=IMAGENET_STD)),  # type: ignore[arg-type]
        resize=str(desc.get("resize", "never")),
        precision=str(desc.get("precision", "fp32")),
        source="wsi-ssl",
        description=f"wsi-ssl pretrain {desc.get('which', 'teacher')} backbone",
        stain=desc.get("stain"),
        mpp=trained_mpp(desc, _size(size)),
    )


def _locate_checkpoint(spec: str, *, weights: str | Path | None, how: str = "") -> Path:
    """The run or checkpoint ``spec`` names (its weights are in it: ``weights`` is refused)."""
    path = Path(spec.removeprefix(PREFIX)).expanduser()
    if weights is not None:
        raise ConfigError(
            f"{path}: a wsi-ssl checkpoint carries its own weights; leave weights=None",
            parameters=("weights",),
        )
    if not path.exists():
        raise CheckpointError(f"{path}: no such wsi-ssl pretrain run or checkpoint")
    return path


@register_source(
    "wsi-ssl",
    matches=is_checkpoint,
    description="a `wsi-ssl pretrain` run directory or checkpoint file (teacher backbone)",
    locate=_locate_checkpoint,
)
def _load_checkpoint(
    spec: str, *, weights: str | Path | None, seed: int, overrides: dict[str, Any]
) -> Encoder:
    import dataclasses

    path = _locate_checkpoint(spec, weights=weights)
    try:
        from wsi_ssl.ssl import load_encoder
    except Exception as err:  # absent, or a broken torch/torchvision/lightly install
        raise CheckpointError(
            f"{path}: reading wsi-ssl checkpoints needs wsi_ssl.ssl ({err}); install wsi-ssl[ml]"
        ) from err
    try:
        backbone, desc = load_encoder(path, finished=True)
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(
            f"{path}: cannot load the encoder ({type(err).__name__}: {err})"
        ) from err
    desc = dict(desc)
    checkpoint = Path(desc.get("checkpoint") or path)  # a run dir resolves to its latest file
    config = dataclasses.replace(
        config_from_description(desc, path),
        weights_sha256=state_dict_sha256(backbone),
        weights_path=str(checkpoint.resolve()),
        **overrides,
    )
    encoder = Encoder(backbone, config)
    if checkpoint.is_file():
        encoder.checkpoint_sha256 = file_sha256(checkpoint)  # type: ignore[attr-defined]
    return encoder
