"""The valid values of :class:`~wsi_ssl.ssl.config.PretrainConfig` and the checks that
refuse others with a ``ConfigError`` naming the field (no torch import, but for a backbone that
is not a ViT, whose check imports the method's recipe to read its ``needs_vit``).

:func:`check_config` runs them all; ``PretrainConfig.__post_init__`` calls it. The checks that
depend on the backbone (:func:`check_arch`) wait, when ``init`` is set, until the init's
architecture is adopted (``wsi_ssl.ssl.init.apply_init`` runs them).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from wsi_ssl.errors import ConfigError
from wsi_ssl.ssl.backbones import get_spec
from wsi_ssl.ssl.methods import RECIPES
from wsi_ssl.stain_settings import METHODS, check_stain_settings

if TYPE_CHECKING:
    from wsi_ssl.ssl.config import PretrainConfig

__all__ = [
    "AUGMENTS",
    "DEVICES",
    "PRECISIONS",
    "SAMPLINGS",
    "STAIN_METHODS",
    "check_arch",
    "check_config",
]

AUGMENTS = ("auto", "loader", "batch")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAMPLINGS = ("uniform", "balanced")
STAIN_METHODS = METHODS  # wsi_ssl.stain_settings (torch-free), as wsi_ssl.stain implements


def check_config(c: PretrainConfig) -> None:
    """Raise ``ConfigError`` (or ``ArchitectureMismatchError``) for an invalid field."""
    _choice("method", c.method, tuple(RECIPES.names()))
    _positive_int(c, "out_dim", "hidden_dim", "bottleneck_dim", "batch_size", "n_local_crops")
    _positive_int(c, "checkpoint_every", "keep_checkpoints", "log_every")
    _augmentations(c)
    _schedules(c)
    _runtime_fields(c)
    _recipe_fields(c)
    _data_fields(c)
    if c.init is None:  # else the init's architecture decides, once adopted
        check_arch(c)


def check_arch(c: PretrainConfig) -> None:
    """The checks of ``c.arch``: crop sizes fit its patch size, a masking method has a ViT."""
    spec = get_spec(c.arch)
    for name in ("global_crop_size", "local_crop_size"):
        size, patch = getattr(c, name), spec.patch_size or 1
        if size % patch and _crop_used(c, name):
            near = [m for m in (size // patch * patch, (size // patch + 1) * patch) if m >= 8]
            raise ConfigError(
                f"{name} must be a multiple of {c.arch}'s patch size {patch}; got {size}: "
                f"pass {name}={near[-1]}" + (f" (or {near[0]})" if len(near) > 1 else ""),
                parameters=(name,),
            )
    # a ViT passes without importing the recipe (torch); another backbone asks the recipe
    if spec.family not in ("vit", None) and RECIPES.get(c.method).needs_vit:
        from wsi_ssl.errors import ArchitectureMismatchError

        raise ArchitectureMismatchError(
            f"method {c.method!r} masks image patches and needs a ViT backbone, but arch "
            f"{c.arch!r} is a {spec.family}; choose a vit_* arch (or an "
            "init that is a ViT) or method='dino'",
            parameters=("arch", "init", "method"),
        )


def _crop_used(c: PretrainConfig, name: str) -> bool:
    """Whether the method reads the crops ``name`` sizes (MAE reads no local crop; asked
    only of a size that would be refused, so a valid config imports no recipe)."""
    return name != "local_crop_size" or RECIPES.get(c.method).uses_local_crops


def _augmentations(c: PretrainConfig) -> None:
    for name in ("global_crop_size", "local_crop_size"):
        size = getattr(c, name)
        if not isinstance(size, int) or size < 8:
            raise ConfigError(f"{name} must be an integer >= 8; got {size!r}")
    if c.local_crop_size > c.global_crop_size and _crop_used(c, "local_crop_size"):
        raise ConfigError(
            f"local_crop_size ({c.local_crop_size}) must not exceed global_crop_size "
            f"({c.global_crop_size})"
        )
    for name in ("global_crop_scale", "local_crop_scale", "blur_sigma"):
        lo, hi = _pair(c, name, 2)
        if not 0 < lo <= hi or (name != "blur_sigma" and hi > 1):
            raise ConfigError(f"{name} must be (lo, hi) with 0 < lo <= hi <= 1; got {(lo, hi)}")
    for name in (
        "hflip_prob",
        "vflip_prob",
        "rot90_prob",
        "hed_jitter_prob",
        "color_jitter_prob",
        "grayscale_prob",
        "solarization_prob",
        "drop_path_rate",
    ):
        _unit(name, getattr(c, name))
    for p in _pair(c, "blur_probs", 3):
        _unit("blur_probs", p)
    for name in ("hed_sigma", "brightness", "contrast", "saturation"):
        if not 0 <= getattr(c, name) < 1:
            raise ConfigError(f"{name} must be in [0, 1); got {getattr(c, name)}")
    if not 0 <= c.hue <= 0.5:
        raise ConfigError(f"hue must be in [0, 0.5]; got {c.hue}")
    _pair(c, "mean", 3)
    if any(not s > 0 for s in _pair(c, "std", 3)):
        raise ConfigError(f"std must be three positive numbers; got {c.std}")


def _schedules(c: PretrainConfig) -> None:
    if c.steps is not None and (not isinstance(c.steps, int) or c.steps < 1):
        raise ConfigError(f"steps must be a positive integer or None; got {c.steps!r}")
    if not (math.isfinite(c.epochs) and c.epochs > 0):
        raise ConfigError(f"epochs must be > 0; got {c.epochs}")
    for name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
        if not getattr(c, name) >= 0:
            raise ConfigError(f"{name} must be >= 0; got {getattr(c, name)}")
    for name in ("base_lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad"):
        if not getattr(c, name) >= 0:
            raise ConfigError(f"{name} must be >= 0; got {getattr(c, name)}")
    if not c.base_lr > 0:
        raise ConfigError(f"base_lr must be > 0; got {c.base_lr}")
    for name in ("momentum_teacher", "center_momentum"):
        if not 0 <= getattr(c, name) < 1:
            raise ConfigError(f"{name} must be in [0, 1); got {getattr(c, name)}")
    if not c.momentum_teacher <= c.momentum_teacher_end <= 1:
        raise ConfigError(
            f"momentum_teacher_end must be in [momentum_teacher, 1]; got {c.momentum_teacher_end}"
        )
    for name in ("warmup_teacher_temp", "teacher_temp", "student_temp"):
        if not getattr(c, name) > 0:
            raise ConfigError(f"{name} must be > 0; got {getattr(c, name)}")


def _runtime_fields(c: PretrainConfig) -> None:
    _choice("sampling", c.sampling, SAMPLINGS)
    _choice("augment", c.augment, AUGMENTS)
    _choice("device", c.device, DEVICES)
    _choice("precision", c.precision, PRECISIONS)
    if c.tile_size is not None and c.tile_size < 16:
        raise ConfigError(f"tile_size must be >= 16 or None; got {c.tile_size}")
    if c.mpp is not None and not c.mpp > 0:
        raise ConfigError(f"mpp must be > 0 or None; got {c.mpp}")
    if c.num_threads is not None and c.num_threads < 1:
        raise ConfigError(f"num_threads must be >= 1 or None; got {c.num_threads}")
    if c.num_workers is not None and c.num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0 or None; got {c.num_workers}")
    if c.precision == "fp16" and c.device == "cpu":
        raise ConfigError(
            "precision 'fp16' needs CUDA, not device 'cpu'; use precision='bf16' or "
            "precision='fp32' on the CPU (a resumed run may change it)",
            parameters=("precision",),
        )


def _recipe_fields(c: PretrainConfig) -> None:
    _positive_int(c, "sinkhorn_iterations", "decoder_dim", "decoder_depth", "decoder_heads")
    for name in ("ibot_loss_weight", "koleo_loss_weight", "teacher_warmup_epochs"):
        if not getattr(c, name) >= 0:
            raise ConfigError(f"{name} must be >= 0; got {getattr(c, name)}")
    for name in ("mask_probability", "min_tissue"):
        _unit(name, getattr(c, name))
    lo, hi = _pair(c, "mask_ratio", 2)
    if not 0 < lo <= hi < 1:
        raise ConfigError(f"mask_ratio must be (lo, hi) with 0 < lo <= hi < 1; got {(lo, hi)}")
    if not 0 < c.mae_mask_ratio < 1:
        raise ConfigError(f"mae_mask_ratio must be in (0, 1); got {c.mae_mask_ratio}")
    if c.decoder_dim % c.decoder_heads:
        raise ConfigError(
            f"decoder_dim ({c.decoder_dim}) must be a multiple of decoder_heads ({c.decoder_heads})"
        )
    if not 0 < c.layer_decay <= 1:
        raise ConfigError(f"layer_decay must be in (0, 1]; got {c.layer_decay}")
    if not isinstance(c.freeze_blocks, int) or c.freeze_blocks < 0:
        raise ConfigError(f"freeze_blocks must be an integer >= 0; got {c.freeze_blocks!r}")
    if c.init_weights is not None and c.init is None:
        raise ConfigError("init_weights needs init (the encoder the weights belong to)")


def _data_fields(c: PretrainConfig) -> None:
    if not 0 <= c.min_tile_std < 128:
        raise ConfigError(f"min_tile_std must be in [0, 128); got {c.min_tile_std}")
    check_stain_settings(c.stain_normalize, c.stain_reference)


def _positive_int(config: PretrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer; got {value!r}")


def _unit(name: str, value: Any) -> None:
    if not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{name} must be in [0, 1]; got {value!r}")


def _pair(config: PretrainConfig, name: str, n: int) -> tuple[float, ...]:
    value = getattr(config, name)
    if (
        not isinstance(value, tuple)
        or len(value) != n
        or not all(isinstance(v, int | float) and math.isfinite(v) for v in value)
    ):
        raise ConfigError(f"{name} must be {n} numbers; got {value!r}")
    return value


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name} must be one of {', '.join(valid)}; got {value!r}")
