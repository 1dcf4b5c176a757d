"""Continued pretraining: student and teacher start from an existing encoder's weights.

``PretrainConfig.init`` names the encoder: a name of the encoder registry (``"uni"``,
``"vit_small_patch16_224"``) or ``"timm/<arch>"``, whose weights come from
``init_weights`` (or the registry's default weights path; nothing is downloaded), or a
previous ``wsi-ssl pretrain`` run directory or checkpoint (its teacher backbone). The run's
``arch`` becomes ``"encoder:<init>"`` (the registry architecture, see
:mod:`wsi_ssl.ssl.backbones`) or the previous run's arch. The heads start at random, so a
short ``teacher_warmup_epochs`` lets them fit the pretrained features first; ``layer_decay``
and ``freeze_blocks`` keep the early layers close to their weights (:mod:`wsi_ssl.ssl.optim`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_ssl.errors import CheckpointError, ConfigError, WeightsNotFoundError
from wsi_ssl.ssl.backbones import ENCODER_PREFIX, pretraining_module
from wsi_ssl.ssl.config import IMAGENET_MEAN, IMAGENET_STD, PretrainConfig
from wsi_ssl.ssl.config_checks import check_arch

__all__ = ["RUN_PREFIX", "apply_init", "check_init_weights", "init_is_run", "load_init"]

RUN_PREFIX = "wsi-ssl:"
Normalisation = tuple[tuple[float, ...], tuple[float, ...]]
"""An input normalisation: (mean, std) per RGB channel."""


def init_is_run(init: str) -> bool:
    """Whether ``init`` is a previous run or checkpoint (rather than a registry name). A
    registry name (``uni``, ``timm/<arch>``) names the registry's encoder even where a folder
    of that name is at hand (its weights, say): ``./uni`` names the folder."""
    if init.startswith(RUN_PREFIX):
        return True
    from wsi_ssl.encoders.registry import ENCODERS

    if init in ENCODERS or init.startswith("timm/"):
        return False
    return Path(init).expanduser().exists()


def apply_init(config: PretrainConfig) -> PretrainConfig:
    """``config`` with ``arch`` set to ``init``'s architecture (unchanged without init), and
    the checks of that architecture passed (:func:`check_arch`). The init's input
    normalisation (mean, std) replaces the default ImageNet one: a foundation model trained
    on other statistics (Hibou, H-optimus, Midnight) sees its tiles as it was trained to."""
    if config.init is None:
        return config
    if init_is_run(config.init):
        from wsi_ssl.ssl.encoder import load_encoder

        if config.init_weights is not None:
            raise ConfigError(
                f"init {config.init!r} is a pretrain run, which carries its own weights; "
                f"leave init_weights out (it names {config.init_weights})",
                parameters=("init_weights",),
            )

        description = load_encoder(_run_path(config.init)).description
        arch = description["arch"]
        norm: Normalisation | None = (tuple(description["mean"]), tuple(description["std"]))
    else:
        arch, norm = ENCODER_PREFIX + config.init, _registry_normalisation(config.init)
    changes: dict[str, object] = {} if arch == config.arch else {"arch": arch}
    if norm is not None and (tuple(config.mean), tuple(config.std)) == (
        IMAGENET_MEAN,
        IMAGENET_STD,
    ):
        changes.update(mean=tuple(norm[0]), std=tuple(norm[1]))
    adopted = config.replace(**changes) if changes else config
    check_arch(adopted)
    return adopted


def _registry_normalisation(name: str) -> Normalisation | None:
    """The (mean, std) a registered encoder normalises its input with (None: ``timm/<arch>``
    and other sources, which normalise as ImageNet)."""
    from wsi_ssl.encoders.registry import ENCODERS

    if name not in ENCODERS:
        return None
    config = ENCODERS.get(name).config
    return tuple(config.mean), tuple(config.std)


def _run_path(init: str) -> Path:
    return Path(init.removeprefix(RUN_PREFIX)).expanduser()


def init_state(config: PretrainConfig) -> dict[str, torch.Tensor]:
    """The backbone weights ``init`` names."""
    assert config.init is not None
    if init_is_run(config.init):
        from wsi_ssl.ssl.encoder import load_encoder

        if config.init_weights is not None:
            raise ConfigError(
                f"init {config.init!r} is a pretrain run, which carries its own weights; "
                f"leave init_weights out (it names {config.init_weights})",
                parameters=("init_weights",),
            )

        # a run's encoder may pool its ViT as its preset does (PooledViT): train the ViT
        return pretraining_module(load_encoder(_run_path(config.init)).model).state_dict()
    from wsi_ssl.encoders import create_encoder

    check_init_weights(config)
    model = create_encoder(config.init, weights=config.init_weights).model
    return pretraining_module(model).state_dict()


def check_init_weights(config: PretrainConfig) -> None:
    """Refuse a registry ``init`` whose weights file is missing, found without reading it: a
    run checks this before it builds or writes anything (nothing to do without ``init``, or
    when it names a run).

    Raises:
        WeightsNotFoundError: no such file (advised as ``init_weights``).
    """
    if config.init is None or init_is_run(config.init):
        return
    from wsi_ssl.encoders import locate_weights

    try:  # a missing file advised in this config's words (init_weights, not weights)
        locate_weights(config.init, weights=config.init_weights, how="pass init_weights=PATH")
    except WeightsNotFoundError as err:
        err.parameters = ("init_weights",)
        raise


def load_init(backbone: nn.Module, config: PretrainConfig) -> None:
    """Load ``init``'s weights into a freshly built backbone of ``config.arch``; a ViT run
    trained at another crop size has its position embeddings resampled to this one's grid."""
    state = _fit_pos_embed(init_state(config), backbone)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"init {config.init!r}: weights do not fit a {config.arch} backbone "
            f"({str(err).splitlines()[0]})"
        ) from err


def _fit_pos_embed(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with its ``pos_embed`` resampled (timm, bicubic) to ``backbone``'s patch grid
    where the two grids differ; unchanged otherwise."""
    pos, target = state.get("pos_embed"), getattr(backbone, "pos_embed", None)
    if pos is None or not isinstance(target, torch.Tensor) or pos.shape == target.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    vit: Any = backbone  # a timm VisionTransformer
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    grid = vit.patch_embed.grid_size
    resampled = resample_abs_pos_embed(pos, list(grid), num_prefix_tokens=int(prefix))
    return {**state, "pos_embed": resampled}
